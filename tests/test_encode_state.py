"""The latent encode's resume state at scale: each shard's captions in a file of its own, not in the state."""

import json

import pytest

from test_folders import _prep
from test_vae import write_images


def _captioned(folder, n):
    write_images(folder, [f"{i}.png" for i in range(n)])
    (folder / "captions.jsonl").write_text("".join(json.dumps({"file": f"{i}.png", "caption": f"pic \u2028 {i}"}) + "\n"
                                                   for i in range(n)))


def test_captions_live_beside_the_state_not_in_it(vae, tmp_path):
    """The state held every finished shard's captions and was rewritten whole after each shard: 1.28M captioned
    images made a 212 MB state and ~10 minutes of rewrites. Now the state holds counts; the captions file is the same
    bytes, an encode interrupted under the old state resumes, and a lost captions file re-encodes its shard alone."""
    from data.encode import CAPTIONS_DIR, STATE_FILE

    _captioned(tmp_path / "s", 7)
    _prep(tmp_path / "s", vae, tmp_path / "full", shard_size=3)
    caps = (tmp_path / "full" / "captions-train.jsonl").read_bytes()
    rows = [json.loads(line) for line in caps.decode().split("\n") if line]   # one line per record, in order
    assert [r["caption"] for r in rows] == [f"pic \u2028 {i}" for i in range(7)]
    assert [r["file"].split(":")[0] for r in rows] == [f"{i}.png" for i in range(7)]
    state = json.loads((tmp_path / "full" / STATE_FILE).read_text())
    assert len(state["shards"]) == 3 and not any("captions" in info for info in state["shards"].values())
    assert len(list((tmp_path / "full" / CAPTIONS_DIR).iterdir())) == 3

    # interrupted after one shard, its captions moved into the state as the code before this wrote it: resumed
    def stop(name):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        _prep(tmp_path / "s", vae, tmp_path / "o", shard_size=3, on_shard=stop)
    state = json.loads((tmp_path / "o" / STATE_FILE).read_text())
    (name, info), = state["shards"].items()
    side = tmp_path / "o" / CAPTIONS_DIR / info.pop("captions_file")
    info["captions"] = [json.loads(line) for line in side.read_text().split("\n") if line]
    side.unlink()
    (tmp_path / "o" / STATE_FILE).write_text(json.dumps(state))
    written = []
    _prep(tmp_path / "s", vae, tmp_path / "o", shard_size=3, on_shard=written.append)
    assert len(written) == 2 and name not in written
    assert (tmp_path / "o" / "captions-train.jsonl").read_bytes() == caps

    # a finished shard whose captions file went: that shard alone is encoded again
    lost = sorted((tmp_path / "full" / CAPTIONS_DIR).iterdir())[1]
    lost.unlink()
    written = []
    _prep(tmp_path / "s", vae, tmp_path / "full", shard_size=3, on_shard=written.append)
    assert written == [lost.name[:-len(".jsonl")]] and lost.is_file()
    assert (tmp_path / "full" / "captions-train.jsonl").read_bytes() == caps
