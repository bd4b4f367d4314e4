"""Dry runs give different messages different idempotency keys (a receiver that drops repeats
by key, sent dry-run Outgoings, keeps both), and the same bytes the same key, as a resend's on
the hub: a test can check de-duplication against a real receiver."""

from __future__ import annotations

import asyncio
from pathlib import Path

from carehub.components import Outgoing
from carehub.testing import HTTPReceiver, bind_channel, make_adt, run_routes, run_routes_all


def project(folder: Path, url: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "routes.yaml").write_text(
        "routes:\n"
        "  - name: r1\n"
        "    steps:\n"
        f"      - forward: {{channel: webhook, name: a, url: '{url}'}}\n",
        encoding="utf-8",
    )
    config = folder / "carehub.yaml"
    config.write_text("routes: [routes.yaml]\n", encoding="utf-8")
    return config


def test_different_messages_get_different_keys_and_a_resend_the_same(tmp_path: Path) -> None:
    with HTTPReceiver(status=202) as receiver:
        config = project(tmp_path / "project", receiver.url("/in"))
        (k1,) = run_routes(make_adt("K1"), config, tmp_path / "data").deliveries
        (k2,) = run_routes(make_adt("K2"), config, tmp_path / "data").deliveries
        (again,) = run_routes(make_adt("K1"), config, tmp_path / "data").deliveries
        batch = run_routes_all(make_adt("K3") + make_adt("K4"), config, tmp_path / "data")
        channel = bind_channel(config, "r1/a", tmp_path / "data")

        async def send(*outgoing: Outgoing) -> None:
            await channel.start()
            try:
                for one in outgoing:
                    await channel.send(one)
            finally:
                await channel.close()

        asyncio.run(send(k1.outgoing, k2.outgoing))
        first, second = receiver.wait_for_requests(2)

    keys = [k1.outgoing.idempotency_key, k2.outgoing.idempotency_key]
    keys += [result.deliveries[0].outgoing.idempotency_key for result in batch]
    assert len(set(keys)) == 4, keys
    assert again.outgoing.idempotency_key == k1.outgoing.idempotency_key
    # What a receiver de-duplicates by: two messages, two keys.
    assert first.headers["idempotency-key"] == k1.outgoing.idempotency_key
    assert second.headers["idempotency-key"] == k2.outgoing.idempotency_key
