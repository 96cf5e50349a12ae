"""``knn-classifier``: the command line of the service (``python -m knn_classifier.client.cli``).

Installed with the client; ``pip install 'knn-classifier-client[cli]'`` adds progress bars.
"""

from ._main import main

__all__ = ["main"]
