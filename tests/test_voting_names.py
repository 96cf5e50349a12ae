"""The voting methods have one home, the proto's Voting enum: the server's voting.Voting, its
settings and the client's names must each name exactly the proto's methods."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from knn_classifier.client._requests import VOTING_NAMES, voting, voting_name
from knn_classifier.server.settings import ClassifierDefaults
from knn_classifier.server.voting import Voting
from knn_classifier.v1 import classifier_pb2 as pb

PROTO_METHODS = {name for name, number in pb.Voting.items() if number != pb.VOTING_UNSPECIFIED}


def test_the_server_implements_exactly_the_proto_methods() -> None:
    assert {f"VOTING_{method.name}" for method in Voting} == PROTO_METHODS
    assert {f"VOTING_{method.value.upper()}" for method in Voting} == PROTO_METHODS


def test_the_client_names_exactly_the_proto_methods() -> None:
    assert {f"VOTING_{name.upper()}" for name in VOTING_NAMES} == PROTO_METHODS
    for name in VOTING_NAMES:
        assert pb.Voting.Name(voting(name)) == f"VOTING_{name.upper()}"
        assert voting_name(voting(name)) == name


def test_client_and_server_spell_each_method_alike() -> None:
    assert set(VOTING_NAMES) == {method.value for method in Voting}


def test_the_default_voting_setting_takes_every_method_and_nothing_else() -> None:
    for method in Voting:
        assert ClassifierDefaults(voting=method.value).voting is method
    with pytest.raises(ValidationError, match="voting"):
        ClassifierDefaults(voting="plurality")


def test_the_client_refuses_an_unknown_method_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="softmax"):
        voting("plurality")
