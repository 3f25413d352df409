"""ddpfleet's tasks for `invoke` in this checkout: `invoke --list`.

The collection lives in the package (ddpfleet/cli/tasks.py), so an installed ddpfleet and this
checkout run the same tasks with the same flags.
"""

from ddpfleet.cli.tasks import ns  # noqa: F401  (Invoke loads the collection named ns)
