"""`python -m distres.train`: runs the command, which lives in distres.cli.train."""

if __name__ == "__main__":
    from distres.cli.train import main
    from distres.log import exit_process

    exit_process(main())
