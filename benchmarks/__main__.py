"""`python -m llama3_deploy.benchmarks ...`: the same as `llama3-deploy bench ...`."""
import sys

from .cli import main

sys.exit(main())
