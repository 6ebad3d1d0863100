"""`python -m distres.launch`: runs the command, which lives in distres.cli.launch."""

if __name__ == "__main__":
    from distres.cli.launch import main
    from distres.log import exit_process

    exit_process(main())
