"""The ClientApp and ServerApp as a Flower app, for a real deployment on other machines.

The settings come from the Flower run config (`FederatedConfig.from_run_config`: the keys of
`FederatedConfig` with hyphens) in the ``pyproject.toml`` of an app folder (a ``[project]``
with a name and version, ``dgst-tf`` among its dependencies)::

    [tool.flwr.app]
    publisher = "you"

    [tool.flwr.app.components]
    serverapp = "dgst_tf.federated.app:server"
    clientapp = "dgst_tf.federated.app:client"

    [tool.flwr.app.config]
    dataset = "cifar10"
    clients = 10
    rounds = 20
    method = "dgsu"
    encoding = "int8"

Start a SuperLink on the server machine (``flower-superlink --insecure --host 0.0.0.0``;
Flower 1.42 serves its Fleet, Control and runtime APIs over HTTP on port 8000) and one
SuperNode per device machine, each told which share of the data it holds::

    flower-supernode --insecure --superlink SERVER:8000 \
        --node-config "partition-id=0 num-partitions=10"

then name the SuperLink in ``$FLWR_HOME/config.toml`` (default ``~/.flwr``; a section
``[superlink.lab]`` with ``address = "SERVER:8000"`` and ``insecure = true``) and submit the
run from the app folder: ``flwr run . lab``. The ServerApp writes ``results.json`` into the
SuperLink's working folder. (Run this way on one machine with two SuperNodes, each with its
own ``--port``, this gave the same kind of results as the simulation.) The same two objects
are what `dgst_tf.federated.simulation.run_federated` runs on Ray, built there with an
explicit config.
"""
from dgst_tf.federated.client import client_app
from dgst_tf.federated.server import server_app

client = client_app()
server = server_app(output_dir=".")
