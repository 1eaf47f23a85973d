import logging
import os
import sys

from prefpretrain.cli import main

code = main()
if sys.argv[1:2] == ["train"]:
    # A rank's work is done and on disk (files closed, process group destroyed). Skip the interpreter's teardown:
    # C++ destructors of background threads (gloo, DeepSpeed) abort a finished rank now and then ("terminate
    # called without an active exception", SIGABRT), which torchrun would report as a failed run.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
