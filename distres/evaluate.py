"""`python -m distres.evaluate`: runs the command, which lives in distres.cli.evaluate."""

if __name__ == "__main__":
    from distres.cli.evaluate import main
    from distres.log import exit_process

    exit_process(main())
