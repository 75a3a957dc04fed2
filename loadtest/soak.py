"""Soak test driver: a flat request rate for 20 minutes against a running `braintumor serve`, recording the server's
memory every 10 s (rss.csv) and failing on any failed request or on steady memory growth.

    python loadtest/soak.py --target http --url http://localhost:3000 --out runs/soak
    python loadtest/soak.py --target grpc --url localhost:50051 --out runs/soak-grpc --duration 60 --rss-interval 2

The same as ``braintumor loadtest --profile soak ...`` (every option of that command is accepted; the logic lives in
``braintumor.loadtest.commands``).
Growth limit: ``--max-growth`` MB/min (default 2), the least-squares slope of each process group's resident memory
(gateway, gRPC server, Triton, supervisor) over the second half of the run; the first half is warm-up.
"""

from __future__ import annotations

import sys

from braintumor.serving.cli import main

if __name__ == "__main__":
    sys.exit(main(["loadtest", "--profile", "soak", *sys.argv[1:]]))
