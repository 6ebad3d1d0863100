"""`python -m distres.report`: runs the command, which lives in distres.cli.report."""

if __name__ == "__main__":
    from distres.cli.report import main
    from distres.log import exit_process

    exit_process(main())
