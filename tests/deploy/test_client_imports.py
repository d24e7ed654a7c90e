"""The ClientApp stays light: a device with ``fedsim[client]`` has no Ray, plots,
mlxtend, scikit-learn or flwr-datasets, and never needs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.deploy.datafiles import device_folders

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("ray", "matplotlib", "mlxtend", "sklearn", "flwr_datasets")

# Runs in a fresh interpreter: import the ClientApp, then serve a hello and a
# train message on the data-path route through the module-level `app`, with the
# run config and node config a SuperNode would hand it.
SCRIPT = """
import json, sys
heavy = {heavy!r}
import clients.client_app as client_app
loaded = {{"import": sorted(m for m in heavy if m in sys.modules)}}
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from fedsim import models
from fedsim.inprocess import InProcessGrid
run_config = {{
    "dataset": "mnist", "partition": "iid", "model": "mlp", "strategy": "fedavg",
    "num_clients": 1, "num_rounds": 1, "seed": 0,
    "overrides": "model.hidden=[16] dataset.data_dir={server}",
}}
grid = InProcessGrid(client_app.app, 1, run_config=run_config)
node_id = grid.get_node_ids()[0]
grid.contexts[node_id].node_config = {{"data-path": {device!r}}}
hello = grid.send_and_receive(
    [Message(RecordDict({{"config": ConfigRecord()}}), node_id, "query.hello")]
)[0]
model = models.build("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=[16])
content = RecordDict(
    {{"arrays": ArrayRecord(model.state_dict()),
     "config": ConfigRecord({{"server-round": 1}})}}
)
train = grid.send_and_receive([Message(content, node_id, "train")])[0]
assert not hello.has_error(), hello.error
assert not train.has_error(), train.error
loaded["data-path route"] = sorted(m for m in heavy if m in sys.modules)
loaded["examples"] = [
    int(hello.content["metrics"]["num-examples"]),
    int(train.content["metrics"]["num-examples"]),
]
print(json.dumps(loaded))
"""


def test_client_app_and_its_data_path_route_import_nothing_heavy(
    tmp_path: Path,
) -> None:
    server, devices = device_folders(tmp_path, 1)
    script = SCRIPT.format(heavy=HEAVY, server=server, device=str(devices[0]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["import"] == []
    assert loaded["data-path route"] == []
    # the device trained on its whole train split: 1497 digits minus 60 held out
    assert loaded["examples"] == [1497 - 60, 1497 - 60]
