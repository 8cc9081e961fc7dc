"""`ray job submit --working-dir . -- python jobs/mine_circuit.py MANIFEST`: capture, reduce, publish.

Inside a Ray job RAY_ADDRESS is set, so the CLI's mine joins the job's cluster. The circuit URI is the last line.
"""

import sys

from cna_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["mine", *sys.argv[1:]]))
