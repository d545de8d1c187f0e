"""On-disk latent and caption-encoding caches (`trainers.data.cache`), on the real tiny SD1.5 models."""
import copy
import hashlib
import logging

import pytest
import safetensors.torch
import torch

import comfy.hooks
import comfy.sd

SETTINGS = {"bucket": [64, 64], "crop": [0, 0], "flip": False, "resize": "lanczos"}


@pytest.fixture(scope="module")
def cache(comfy_runtime):
    return comfy_runtime.pack_import("trainers.data.cache")


def _load(path):
    """(clip, vae) of a checkpoint, loaded as the executor does (under inference mode)."""
    with torch.inference_mode():
        _, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    return clip, vae


@pytest.fixture(scope="module")
def base(tiny_checkpoint_path):
    return _load(tiny_checkpoint_path)


def _encode(clip, caption="a photo"):
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(caption))


def _files(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def _nudge_one_weight(module, name):
    """Change one value of the tensor `name` by one unit in the last place, at an index the strided
    sample skips (index 1)."""
    t = module.state_dict()[name]
    bits = {2: torch.int16, 4: torch.int32}[t.element_size()]
    t.view(-1).view(bits)[1] += 1


# -- keys -----------------------------------------------------------------------------------------

def test_content_hash(cache, tmp_path):
    """sha256 of the bytes: same bytes same hash, one byte changed a different one."""
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"\x89PNG" + bytes(range(200)))
    b.write_bytes(b"\x89PNG" + bytes(range(199)) + b"\x00")
    assert cache.content_hash(a) == hashlib.sha256(a.read_bytes()).hexdigest()
    assert cache.content_hash(a) != cache.content_hash(b)


def test_latent_key_changes_with_each_input(cache, tmp_path):
    """Image hash, VAE fingerprint and every setting change the key; dict order and a new run do not."""
    latents = cache.LatentCache(tmp_path)
    key = latents.key("img", "vae", SETTINGS)
    variants = [latents.key("img2", "vae", SETTINGS), latents.key("img", "vae2", SETTINGS),
                latents.key("img", "vae", {**SETTINGS, "tiled": True})]
    for name, value in [("bucket", [64, 96]), ("crop", [0, 8]), ("flip", True), ("resize", "bicubic")]:
        variants.append(latents.key("img", "vae", {**SETTINGS, name: value}))
    assert len({key, *variants}) == len(variants) + 1
    assert cache.LatentCache(tmp_path).key("img", "vae", dict(reversed(SETTINGS.items()))) == key
    with pytest.raises(TypeError):
        latents.key("img", "vae", {"bad": object()})


def test_text_key_changes_with_each_input(cache, tmp_path):
    """Caption and CLIP fingerprint change the key; a latent key of the same strings differs."""
    texts = cache.TextEncodingCache(tmp_path)
    key = texts.key("a photo of sks", "clip")
    assert key == cache.TextEncodingCache(tmp_path).key("a photo of sks", "clip")
    assert len({key, texts.key("a photo of sks ", "clip"), texts.key("a photo of sks", "clip2"),
                cache.LatentCache(tmp_path).key("a photo of sks", "clip", {})}) == 4


# -- round trips ----------------------------------------------------------------------------------

def test_latent_round_trip(cache, tmp_path):
    """put/get is exact, counts hits and misses, and a later run (new instance) reads the file."""
    latents = cache.LatentCache(tmp_path)
    key = latents.key("img", "vae", SETTINGS)
    assert latents.get(key) is None
    latent = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
    latents.put(key, latent)
    assert torch.equal(latents.get(key), latent)
    assert (latents.hits, latents.misses) == (1, 1)
    later = cache.LatentCache(tmp_path)
    assert torch.equal(later.get(later.key("img", "vae", SETTINGS)), latent)
    with pytest.raises(KeyError):
        later.put("0" * 64, latent)


def test_latent_round_trip_real_vae(cache, base, tmp_path):
    """A latent from the real VAE (keyed by its fingerprint) comes back bit for bit."""
    _, vae = base
    with torch.inference_mode():
        latent = vae.encode(torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1)))
    latents = cache.LatentCache(tmp_path)
    key = latents.key("img", cache.vae_fingerprint(vae), SETTINGS)
    latents.put(key, latent)
    assert torch.equal(latents.get(key), latent)


def test_conditioning_round_trip_real_clip(cache, base, tmp_path):
    """SD1 CONDITIONING from the real CLIP round-trips exactly, pooled_output included."""
    clip, _ = base
    conditioning = _encode(clip)
    texts = cache.TextEncodingCache(tmp_path)
    key = texts.key("a photo", cache.clip_fingerprint(clip))
    texts.put(key, conditioning)
    got = texts.get(key)
    assert len(got) == len(conditioning) == 1
    (cond, extras), (ref_cond, ref_extras) = got[0], conditioning[0]
    assert torch.equal(cond, ref_cond) and cond.dtype == ref_cond.dtype
    assert list(extras) == list(ref_extras) and "pooled_output" in extras
    for name, value in ref_extras.items():
        assert torch.equal(extras[name], value) if isinstance(value, torch.Tensor) else extras[name] == value


def test_conditioning_round_trip_values(cache, tmp_path):
    """Several entries; plain values keep their type and the dict its order."""
    conditioning = [[torch.randn(1, 77, 8), {"pooled_output": torch.randn(1, 8), "clip_start_percent": 0.0,
                                             "clip_end_percent": 0.5, "n": 3, "flag": True, "none": None, "s": "x"}],
                    [torch.randn(1, 77, 8).half(), {"pooled_output": None,
                                                    "attention_mask": torch.ones(1, 77, dtype=torch.int64)}]]
    texts = cache.TextEncodingCache(tmp_path)
    key = texts.key("c", "clip")
    texts.put(key, conditioning)
    got = texts.get(key)
    for (cond, extras), (ref_cond, ref_extras) in zip(got, conditioning, strict=True):
        assert torch.equal(cond, ref_cond) and cond.dtype == ref_cond.dtype
        assert list(extras) == list(ref_extras)
        for name, value in ref_extras.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(extras[name], value) and extras[name].dtype == value.dtype
            else:
                assert extras[name] == value and type(extras[name]) is type(value)


@pytest.mark.parametrize("value", [comfy.hooks.HookGroup(), (0, 0, 64, 64), [1.0], {"a": 1}])
def test_conditioning_refuses_what_it_cannot_store(cache, tmp_path, value):
    """Hooks and containers would not come back the same: ValueError, and nothing is written."""
    texts = cache.TextEncodingCache(tmp_path)
    key = texts.key("c", "clip")
    with pytest.raises(ValueError):
        texts.put(key, [[torch.zeros(1, 77, 8), {"pooled_output": torch.zeros(1, 8), "extra": value}]])
    assert _files(tmp_path) == []


# -- safety ---------------------------------------------------------------------------------------

def test_other_models_file_is_never_reused(cache, tmp_path, caplog):
    """A key from another fingerprint misses; a file copied under another key (as on a key
    collision) or with tampered metadata is a miss, logged and deleted."""
    latents = cache.LatentCache(tmp_path)
    key_a, key_b = latents.key("img", "vae-a", SETTINGS), latents.key("img", "vae-b", SETTINGS)
    latents.put(key_a, torch.ones(4, 8, 8))
    assert latents.get(key_b) is None

    latents.path(key_b).parent.mkdir(parents=True, exist_ok=True)
    latents.path(key_b).write_bytes(latents.path(key_a).read_bytes())
    for reader in (latents, cache.LatentCache(tmp_path)):  # with and without the key's inputs in memory
        with caplog.at_level(logging.WARNING):
            assert reader.get(key_b) is None
        assert not latents.path(key_b).exists() and "discarding" in caplog.text
        latents.path(key_b).write_bytes(latents.path(key_a).read_bytes())

    path = latents.path(key_a)
    with safetensors.safe_open(str(path), "pt") as f:
        meta, tensor = f.metadata(), f.get_tensor("latent")
    meta["personalize.inputs"] = meta["personalize.inputs"].replace("vae-a", "vae-b")
    safetensors.torch.save_file({"latent": tensor}, str(path), metadata=meta)
    assert cache.LatentCache(tmp_path).get(key_a) is None and not path.exists()


def test_atomic_write_leaves_no_partial_file(cache, tmp_path, monkeypatch):
    """An exception while writing leaves neither a partial file nor a temp file, and the previous
    entry stays readable."""
    latents = cache.LatentCache(tmp_path)
    key = latents.key("img", "vae", SETTINGS)
    latents.put(key, torch.zeros(4, 8, 8))
    before = _files(tmp_path)

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    for k in (key, latents.key("img2", "vae", SETTINGS)):
        with pytest.raises(OSError, match="disk full"):
            latents.put(k, torch.ones(4, 8, 8))
    assert _files(tmp_path) == before
    assert torch.equal(latents.get(key), torch.zeros(4, 8, 8))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_is_a_miss(cache, tmp_path, caplog, damage):
    """A damaged file is a miss, logged as a warning, and deleted."""
    texts = cache.TextEncodingCache(tmp_path)
    key = texts.key("c", "clip")
    texts.put(key, [[torch.randn(1, 77, 8), {"pooled_output": torch.randn(1, 8)}]])
    path = texts.path(key)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\xff" * len(data), "empty": b""}[damage])
    with caplog.at_level(logging.WARNING):
        assert texts.get(key) is None
    assert not path.exists() and (texts.hits, texts.misses) == (0, 1)
    assert any(r.levelno == logging.WARNING and str(path) in r.getMessage() for r in caplog.records)


def test_default_cache_root_is_persistent(cache):
    """Beside ComfyUI's user directory, never inside its temp directory (emptied at start)."""
    import folder_paths
    from pathlib import Path

    root = cache.default_cache_root()
    assert root == Path(folder_paths.get_user_directory()).parent / "cache" / "personalize"
    assert Path(folder_paths.get_temp_directory()) not in (root, *root.parents)


# -- fingerprints ---------------------------------------------------------------------------------

def test_fingerprints_stable_across_reloads(cache, base, tiny_checkpoint_path):
    """Reloading the same file gives the same VAE and CLIP fingerprints; VAE and CLIP differ."""
    clip, vae = base
    clip2, vae2 = _load(tiny_checkpoint_path)
    assert cache.vae_fingerprint(vae) == cache.vae_fingerprint(vae2) == cache.vae_fingerprint(vae)
    assert cache.clip_fingerprint(clip) == cache.clip_fingerprint(clip2)
    assert cache.model_fingerprint(vae.first_stage_model) == cache.model_fingerprint(vae2.first_stage_model)
    assert cache.model_fingerprint(clip.cond_stage_model) == cache.model_fingerprint(clip2.cond_stage_model)
    assert cache.vae_fingerprint(vae) != cache.clip_fingerprint(clip)
    assert cache.model_fingerprint(vae.first_stage_model) != cache.model_fingerprint(clip.cond_stage_model)


@pytest.mark.parametrize("which", ["vae", "clip"])
def test_one_weight_changed_changes_fingerprint(cache, base, which):
    """A copy with a single value of one tensor moved by one ulp has another fingerprint, for the
    first, a middle and the last tensor of the state dict."""
    clip, vae = base
    module = vae.first_stage_model if which == "vae" else clip.cond_stage_model
    reference = cache.model_fingerprint(module)
    # SD1's text_projection is left out: ComfyUI never loads it nor uses it (uninitialised memory)
    names = [n for n, t in module.state_dict().items()
             if t.is_floating_point() and t.numel() > 2 * 64 and "text_projection" not in n]
    for name in (names[0], names[len(names) // 2], names[-1]):
        with torch.inference_mode():
            changed = copy.deepcopy(module)
            _nudge_one_weight(changed, name)
        assert cache.model_fingerprint(changed) != reference, name
        del changed


def test_clip_fingerprint_follows_what_changes_encodings(cache, base):
    """A plain clone shares the fingerprint; another clip layer or a LoRA-style patch changes it; the
    same patch on another clone gives the same fingerprint (reusable across runs)."""
    clip, _ = base
    reference = cache.clip_fingerprint(clip)
    assert cache.clip_fingerprint(clip.clone()) == reference
    layered = clip.clone()
    layered.clip_layer(-2)
    assert cache.clip_fingerprint(layered) != reference

    name = next(k for k in clip.cond_stage_model.state_dict() if k.endswith("layers.0.mlp.fc1.weight"))
    shape = clip.cond_stage_model.state_dict()[name].shape
    diff = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1e-2

    def patched(strength):
        c = clip.clone()
        assert c.add_patches({name: ("diff", (diff,))}, strength) == [name]
        return c

    lora = patched(1.0)
    assert cache.clip_fingerprint(lora) not in (reference, cache.clip_fingerprint(layered))
    assert cache.clip_fingerprint(patched(1.0)) == cache.clip_fingerprint(lora)
    assert cache.clip_fingerprint(patched(0.5)) != cache.clip_fingerprint(lora)
    assert cache.clip_fingerprint(lora.clone()) == cache.clip_fingerprint(lora)

    lora_fp = cache.clip_fingerprint(lora)
    try:
        assert not torch.equal(_encode(lora)[0][0], _encode(clip)[0][0])
        base_weights_fp = cache.model_fingerprint(clip.cond_stage_model)
        _encode(lora)  # the LoRA clone is loaded now: its patch is in the shared module's weights
        assert clip.cond_stage_model.current_weight_patches_uuid == lora.patcher.patches_uuid
        assert cache.model_fingerprint(clip.cond_stage_model) != base_weights_fp
        assert cache.clip_fingerprint(clip) == reference  # from the patcher's backup of the originals
        assert cache.clip_fingerprint(lora) == lora_fp
    finally:
        _encode(clip)  # restores the base weights for the other tests


def test_clip_with_hooks_is_not_fingerprinted(cache, base):
    """Hooks change encodings per step: clip_fingerprint refuses, so callers encode uncached."""
    clip, _ = base
    hooked = clip.clone()
    hooked.apply_hooks_to_conds = comfy.hooks.HookGroup()
    with pytest.raises(ValueError):
        cache.clip_fingerprint(hooked)


def test_full_vae_fingerprint_and_latents(cache, base, tmp_path):
    """The full KL-VAE (what users have): stable across reloads, distinct from TAESD's, and its
    latents round-trip exactly."""
    from harness import cached_tiny_checkpoint

    path = str(cached_tiny_checkpoint("full"))
    with torch.inference_mode():
        vaes = [comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=False)[2] for _ in range(2)]
        latent = vaes[0].encode(torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2)))
    fingerprint = cache.vae_fingerprint(vaes[0])
    assert fingerprint == cache.vae_fingerprint(vaes[1]) != cache.vae_fingerprint(base[1])
    latents = cache.LatentCache(tmp_path)
    key = latents.key("img", fingerprint, SETTINGS)
    latents.put(key, latent)
    assert torch.equal(cache.LatentCache(tmp_path).get(key), latent)
