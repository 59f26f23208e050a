"""`python -m llama3_deploy` is the `llama3-deploy` command."""
import sys

from llama3_deploy.cli import main

sys.exit(main())
