"""TensorBoard scalars for kerasq's callbacks, written with TensorFlow alone.

Example:
>>> import os, tempfile
>>> from kerasq.summaries import scalar_writer, write_scalar
>>> folder = tempfile.mkdtemp()
>>> writer = scalar_writer(folder)
>>> with writer.as_default():
...     write_scalar("layer/sparsity", 0.5, step=3)
>>> writer.flush()
>>> any(name.startswith("events.out.tfevents") for name in os.listdir(folder))
True
"""


def scalar_writer(log_dir):
    """A TensorBoard event-file writer for `log_dir`."""
    import tensorflow as tf

    return tf.summary.create_file_writer(str(log_dir))


def write_scalar(tag, value, step):
    """What `tf.summary.scalar` writes, without needing the tensorboard package installed
    (TensorFlow 2.21 no longer brings it along). Call it inside `writer.as_default()`."""
    import tensorflow as tf

    metadata = tf.compat.v1.SummaryMetadata(plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars"))
    tf.summary.write(tag, tf.constant(value, tf.float32), step=int(step), metadata=metadata)
