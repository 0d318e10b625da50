"""The test suite. Imported before any test module, so before PyTorch loads."""

import os

# As `glad` sets it (service.cli.main): OpenMP threads that wait passively instead of spinning
# keep the suite's speed when other work shares the machine's cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
