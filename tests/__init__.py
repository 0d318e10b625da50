"""The test suite. Imported before any test module, so before PyTorch loads."""

import os

# OpenMP threads that sleep at once instead of spinning keep the suite's speed when other
# work shares the machine's cores. Both variables: `glad` sets GOMP_SPINCOUNT unless it is
# set already (service.cli.main), and its subprocesses inherit this environment.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "0")
