"""A stand-in server for tests of ec262.processes: announces itself, then
writes `--lines N` lines to stderr and a last one, then waits to be stopped."""

import argparse
import signal
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--lines", type=int, default=0)
count = parser.parse_args().lines
sys.stderr.write("listening on 127.0.0.1:9\n")
for number in range(count):
    sys.stderr.write(f"line {number}\n")
sys.stderr.write("all written\n")
sys.stderr.flush()
signal.pause()
