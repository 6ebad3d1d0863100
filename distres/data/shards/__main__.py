"""`python -m distres.data.shards`: the command lives in distres.cli.shards (this module only
runs it)."""

from distres.cli.shards import main
from distres.log import exit_process

exit_process(main())
