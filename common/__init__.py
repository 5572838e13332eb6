"""What the ServerApp and the ClientApp share. Importing it sets up Flower's logging
for both (see :mod:`common.flower_logging`)."""

from common.flower_logging import keep_flower_logs_single

keep_flower_logs_single()
