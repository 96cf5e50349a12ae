"""Settings of the vector store (``KNN_STORE__*``)."""

from __future__ import annotations

from pydantic import BaseModel, Field, SecretStr, model_validator


class StoreSettings(BaseModel):
    """Where the vectors live: embedded Qdrant Edge by default, a Qdrant server if url is set."""

    url: str | None = Field(
        None,
        description=(
            "Qdrant server URL (e.g. http://qdrant:6333). Unset: the embedded store in data_dir."
        ),
    )
    api_key: SecretStr | None = Field(None, description="Qdrant server API key, if any.")
    grpc_port: int = Field(6334, ge=1, le=65535, description="Qdrant server gRPC port.")
    collection_prefix: str = Field(
        "knn",
        pattern=r"^[a-z][a-z0-9_]{0,31}$",
        description="Collections are named <prefix>_d<dimension> and <prefix>_meta.",
    )
    timeout_s: int = Field(10, ge=1, description="Qdrant server request timeout, in seconds.")
    min_free_bytes: int = Field(
        64 * 2**20,
        ge=0,
        description=(
            "Embedded store: free disk space, in bytes, kept in reserve on data_dir's file "
            "system. A write that would leave less is refused with RESOURCE_EXHAUSTED (reads go "
            "on), and the store does not open with less than half of it: it writes through "
            "memory-mapped files, and a full disk would kill the process with SIGBUS."
        ),
    )
    quantize_from_dimension: int | None = Field(
        None,
        ge=1,
        description=(
            "Qdrant server store: collections created for this width or wider keep int8 "
            "copies of the vectors in RAM and the float32 vectors on disk (a quarter of the RAM), "
            "and are searched approximately (HNSW over the int8 copies, candidates rescored with "
            "the float32 vectors) instead of exactly. Unset: float32 in RAM, exact search. "
            "Applies to collections created after it is set; docs/scaling.md has its cost."
        ),
    )
    shard_number: int | None = Field(
        None,
        ge=1,
        description=(
            "Qdrant server store: shards of each collection it creates, spread over the "
            "cluster's nodes (a multiple of the number of nodes; 2 or more per node leaves room "
            "to grow). Unset: Qdrant's default, the number of nodes when the collection is "
            "created. Fixed at creation; docs/scaling.md says how to change it."
        ),
    )
    replication_factor: int | None = Field(
        None,
        ge=1,
        description=(
            "Qdrant server store: copies of each shard, on different nodes, of each collection "
            "it creates; 2 or more (with as many nodes) keeps the service answering while a "
            "node is down. Unset: Qdrant's default (1 unless Qdrant's own configuration sets "
            "another). Applies to collections created after it is set; docs/scaling.md says how "
            "to change an existing one."
        ),
    )
    write_consistency_factor: int | None = Field(
        None,
        ge=1,
        description=(
            "Qdrant server store: copies of a shard that must apply a write before it succeeds, "
            "at most replication_factor. Higher is safer but refuses writes while fewer copies "
            "are up. Unset: Qdrant's default, 1. Applies to collections created after it is set."
        ),
    )
    delete_orphaned_exemplars: bool = Field(
        False,
        description=(
            "At start-up, delete exemplars whose classifier has no record (logged with their "
            "counts) instead of refusing to start. Only for records that are gone for good: "
            "restoring them from a backup keeps the exemplars."
        ),
    )
    write_lease_s: float = Field(
        30.0,
        gt=0,
        description=(
            "Qdrant server store: how long a replica's write lease on a classifier lasts, in "
            "seconds. Writes of a classifier's exemplars take it so that one replica at a time "
            "writes them; a replica finding it held waits at most twice this (less if the call's "
            "deadline is nearer) and then answers ABORTED (CLASSIFIER_BUSY, retryable). A "
            "crashed holder's lease frees itself when it expires; a longer write extends its "
            "lease. Half of it must pass store.timeout_s (one store call; checked when store.url "
            "is set), with room for the replicas' clock skew."
        ),
    )
    model_cache_entries: int = Field(
        256,
        ge=1,
        description=(
            "Label models (one per classifier, dimension and voting method) each replica keeps "
            "in memory, fitted from the exemplars at the classifier's current revision; the "
            "least recently used beyond this are dropped and fitted again when next used. One "
            "holds dimension x labels float32 weights (0.3 MB at 1,024 x 77)."
        ),
    )

    @model_validator(mode="after")
    def _write_quorum_within_replicas(self) -> StoreSettings:
        wanted, copies = self.write_consistency_factor, self.replication_factor or 1
        if wanted is not None and wanted > copies:
            raise ValueError(
                f"store.write_consistency_factor={wanted} exceeds the {copies} copies of each "
                "shard (store.replication_factor): set store.replication_factor to at least as "
                "many, or lower store.write_consistency_factor"
            )
        return self

    @model_validator(mode="after")
    def _lease_outlasts_a_store_call(self) -> StoreSettings:
        """A store write starts with half a lease left; one in flight past the lease's end can
        land after another replica's (docs/design.md, "Classifier records")."""
        if self.url and self.write_lease_s / 2 <= self.timeout_s:
            raise ValueError(
                f"store.write_lease_s={self.write_lease_s:g} must be more than twice "
                f"store.timeout_s={self.timeout_s}: a store write starts with half a lease left "
                "and must end before the lease does"
            )
        return self
