"""create_classifier(exist_ok=True) returns a matching classifier and refuses a different one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from knn_classifier.client import (
    AlreadyExistsError,
    AsyncClient,
    Client,
    SettingsMismatchError,
)

from .conftest import ServerThread

ROOT = Path(__file__).resolve().parents[1]


def test_exist_ok_returns_the_classifier_when_its_settings_match(client: Client) -> None:
    def create(exist_ok: bool) -> object:
        return client.create_classifier(
            "c",
            instruction="Sort the messages",
            k=5,
            voting="softmax",
            min_similarity=0.1,
            temperature=0.03,
            exist_ok=exist_ok,
        )

    first = create(exist_ok=False)
    assert create(exist_ok=True) == first
    # Settings left out match whatever the classifier has.
    assert client.create_classifier("c", exist_ok=True) == first


def test_exist_ok_refuses_other_settings_naming_each(client: Client) -> None:
    client.create_classifier("c", k=5, voting="softmax")
    with pytest.raises(SettingsMismatchError) as raised:
        client.create_classifier("c", k=7, voting="majority", exist_ok=True)
    error = raised.value
    assert isinstance(error, AlreadyExistsError)
    assert error.differences == ["voting is softmax, not majority", "k is 5, not 7"]
    assert error.existing.k == 5
    assert "ALREADY_EXISTS: classifier 'c' exists with other settings" in str(error)
    assert client.get_classifier("c").k == 5


def test_without_exist_ok_an_existing_name_is_still_an_error(client: Client) -> None:
    client.create_classifier("c")
    with pytest.raises(AlreadyExistsError) as raised:
        client.create_classifier("c")
    assert not isinstance(raised.value, SettingsMismatchError)


async def test_async_client_exist_ok(server: ServerThread) -> None:
    async with AsyncClient(server.address) as client:
        first = await client.create_classifier("a", min_confidence=0.3)
        assert await client.create_classifier("a", min_confidence=0.3, exist_ok=True) == first
        with pytest.raises(SettingsMismatchError) as raised:
            await client.create_classifier("a", min_confidence=0.4, exist_ok=True)
        assert raised.value.differences == ["min_confidence is 0.3, not 0.4"]


def readme_tour() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A short tour with the Python client", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found, "the README's tour has no python block"
    return found.group(1)


def test_the_readme_tour_runs_twice_in_a_row(server: ServerThread) -> None:
    code = readme_tour()
    assert '"localhost:50051"' in code
    code = code.replace('"localhost:50051"', repr(server.address))
    for _ in range(2):
        exec(compile(code, "README.md", "exec"), {})
    with server.client() as client:
        assert client.list_labels("support") == {
            "card_arrival": 2, "top_up": 2, "card_stolen": 2, "close_account": 2,
        }  # fmt: skip
