"""Prints every scalar of TensorBoard event files as `tag<TAB>step<TAB>value` lines, read with the
tensorboard package's own loader (which checks each record's CRC-32C) through the compat layer
TensorBoard itself reads with (a `simple_value` becomes a scalar-plugin tensor):
tests/tests/export.rs compares them with GetMetrics. Usage: read_tensorboard.py DIR"""
import pathlib
import sys

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util

files = sorted(pathlib.Path(sys.argv[1]).glob("events.out.tfevents.*"))
if len(files) != 1:
    sys.exit(f"expected one event file in {sys.argv[1]}, found {len(files)}")
versions = 0
for event in EventFileLoader(str(files[0])).Load():
    if event.HasField("file_version"):
        versions += 1
        continue
    for value in event.summary.value:
        plugin = value.metadata.plugin_data.plugin_name
        if plugin != "scalars":
            sys.exit(f"{value.tag} at {event.step}: plugin {plugin!r}, not scalars")
        scalar = float(tensor_util.make_ndarray(value.tensor))
        print(f"{value.tag}\t{event.step}\t{scalar!r}")
if versions != 1:
    sys.exit(f"expected one file_version event, found {versions}")
