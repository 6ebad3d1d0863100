"""`python -m distres.predict`: runs the command, which lives in distres.cli.predict."""

if __name__ == "__main__":
    from distres.cli.predict import main
    from distres.log import exit_process

    exit_process(main())
