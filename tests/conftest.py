import os

# Qt must run headless in tests (pytest-qt aborts without a display otherwise).
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("OMP_NUM_THREADS", "2")
