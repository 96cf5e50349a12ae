"""knn-classifier server: k-nearest-neighbour text classification over gRPC."""
