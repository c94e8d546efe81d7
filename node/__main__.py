"""`python -m node run|bootstrap ...`: the node daemon (what the devnet launches)."""

import sys

from node.cli import main

sys.exit(main(["node", *sys.argv[1:]]))
