"""Moving models between architectures: weight transfer and function-preserving growth."""

from kerasq.transfer.net2net import deepen, widen
from kerasq.transfer.weights import TransferReport, TransferRow, transfer_weights
from kerasq.transfer.legacy import LegacyMigrationError, UnmappableLayersError, migrate_legacy
