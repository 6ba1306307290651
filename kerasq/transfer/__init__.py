"""Moving models between architectures and Keras versions: weight transfer, function-preserving
growth, and legacy tf_keras/tfmot models."""

from kerasq.transfer.legacy import LegacyMigrationError, UnmappableLayersError, migrate_legacy
from kerasq.transfer.net2net import deepen, widen
from kerasq.transfer.weights import TransferReport, TransferRow, transfer_weights
