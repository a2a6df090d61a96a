"""Site side: the ClientApp, local trainers, private state and an optional warm worker."""

import time

IMPORT_STARTED = time.time()  # the round-cost timeline's "imports" start here
