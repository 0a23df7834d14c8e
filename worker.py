"""`python worker.py -v -P 12345`: run a worker from a checkout (same as `ec262 worker`)."""

import sys

from ec262.cli import main

if __name__ == "__main__":
    sys.exit(main(["worker", *sys.argv[1:]]))
