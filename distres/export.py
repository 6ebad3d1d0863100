"""`python -m distres.export`: runs the command, which lives in distres.cli.export."""

if __name__ == "__main__":
    from distres.cli.export import main
    from distres.log import exit_process

    exit_process(main())
