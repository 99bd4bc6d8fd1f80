"""Convert the authors' released PixelRefer / PixelRefer-Lite checkpoints (`pixelrefer convert SRC DST`).

Notable:
- The key map is data: `KEY_RULES`, a list of (part, release regex, our
  template). Every release tensor must match one rule or `UNUSED_RULES`
  (reported, never silently dropped); every tensor of ours must get exactly
  one source; shapes are checked tensor by tensor. Errors name the keys.
- Tensor layouts agree, so nothing is transposed or split: the release's
  vision encoder is the one transformers' VideoLLaMA3 ports (same tensors,
  one `vision_encoder.` level deeper), and OCI keeps `nn.MultiheadAttention`'s
  `in_proj_weight` (3C, C) in q, k, v order, exactly what `infusion.py` reads.
- Weights: `.safetensors` or `.bin`, single or sharded with an index json;
  `.bin` only ever through `torch.load(weights_only=True)` (memory-mapped).
- Config: model_type picks the framework; n = `mask_num`; the release's
  constants (T = 100 / 50, 5 / 3 k-means iterations, OCI 224 / 336 / 8 heads)
  and quirks (swapped position axes; PixelRefer's variable token count; its
  exact prompt text) are written as explicit fields.
- Tokenizer files are copied; the chat tokens, `<image>`, `<|stream_start|>`,
  `<|stream_end|>`, `<REGION>` (the release's additions, in its order) and
  `<video>` are added when missing, and the embedding grows to cover them
  (new rows = the mean row; a `<video>` row is only ever a placeholder that
  frame features replace).
- The output is written to a temporary folder next to DST and renamed into
  place: DST is either complete or untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file
from transformers import AutoTokenizer

from pixelrefer.config import PixelReferConfig
from pixelrefer.modeling import PixelReferForConditionalGeneration
from pixelrefer.presets import preset_kwargs

FRAMEWORK_OF = {"pixelrefer_qwen2": "vision_object", "pixelreferlite_qwen2": "object_only"}

_LAYER = r"model\.layers\.(\d+)\."
_VISION = r"model\.vision_encoder\.vision_encoder\."
_REGION = r"model\.region_encoder\."
KEY_RULES: list[tuple[str, str, str]] = [
    ("llm", r"model\.embed_tokens\.weight", r"model.language_model.embed_tokens.weight"),
    ("llm", _LAYER + r"(self_attn\.[qkv]_proj\.(?:weight|bias))", r"model.language_model.layers.\1.\2"),
    ("llm", _LAYER + r"(self_attn\.o_proj\.weight)", r"model.language_model.layers.\1.\2"),
    ("llm", _LAYER + r"(mlp\.(?:gate|up|down)_proj\.weight)", r"model.language_model.layers.\1.\2"),
    ("llm", _LAYER + r"((?:input|post_attention)_layernorm\.weight)", r"model.language_model.layers.\1.\2"),
    ("llm", r"model\.norm\.weight", r"model.language_model.norm.weight"),
    ("llm", r"lm_head\.weight", r"lm_head.weight"),
    ("vision_encoder", _VISION + r"(embeddings\.patch_embedding\.(?:weight|bias))", r"model.vision_model.\1"),
    ("vision_encoder", _VISION + r"(encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12]|"
     r"layer_norm[12])\.(?:weight|bias))", r"model.vision_model.\1"),
    ("vision_encoder", _VISION + r"(post_layernorm\.(?:weight|bias))", r"model.vision_model.\1"),
    ("image_projector", r"model\.mm_projector\.readout\.([02]\.(?:weight|bias))", r"model.projector.readout.\1"),
    ("object_tokenizer", _REGION + r"feat_linear\.([02]\.(?:weight|bias))", r"model.object_tokenizer.mlp.\1"),
    ("object_tokenizer", _REGION + r"pos_linear\.(weight|bias)", r"model.object_tokenizer.position_proj.\1"),
    ("infusion", _REGION + r"fusion_attention_(local|global)\.(in_proj_weight|in_proj_bias|out_proj\.weight|"
     r"out_proj\.bias)", r"model.infusion.\1_attn.\2"),
    ("infusion", _REGION + r"ln_(local|global)\.(weight|bias)", r"model.infusion.\1_norm.\2"),
]
UNUSED_RULES: list[str] = [
    _REGION + r"mask_embedding\.(?:weight|bias)",  # Lite's Conv2d(1, C, 1): built, never called
    r".*rotary(?:_pos)?_emb\.inv_freq",  # recomputed from the config
]
CHAT_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # Qwen2.5's own
RELEASE_ADDED_TOKENS = ("<image>", "<|stream_start|>", "<|stream_end|>", "<REGION>")
OUR_TOKENS = ("<video>",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                "pytorch_model.bin.index.json", "pytorch_model.bin")
_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "initializer_range",
              "use_sliding_window", "sliding_window", "max_window_layers", "attention_dropout", "bos_token_id",
              "eos_token_id")


class ConversionError(ValueError):
    """The release folder cannot be converted; the message names the files, keys or shapes at fault."""


@dataclass
class ConversionReport:
    """What `convert_release` did."""

    source: str
    destination: str
    framework: str
    mapped: dict[str, int]  # release tensors per part (llm, vision_encoder, ...)
    unused: list[str]  # release tensors with no counterpart in our model, on purpose
    added_tokens: list[str]
    vocab_resize: tuple[int, int] | None  # (release rows, our rows) when new tokens needed rows
    settings: dict  # config fields the converter set for release compatibility
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"converted {self.source} ({self.framework}) -> {self.destination}",
                 f"mapped {sum(self.mapped.values())} tensors: "
                 + ", ".join(f"{part} {count}" for part, count in self.mapped.items())]
        lines.append(f"unused release tensors ({len(self.unused)}): " + (", ".join(self.unused) or "none"))
        lines.append("added tokens: " + (", ".join(self.added_tokens) or "none"))
        if self.vocab_resize:
            lines.append(f"embedding rows: {self.vocab_resize[0]} -> {self.vocab_resize[1]} (new rows = mean row)")
        lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- reading the release


def read_release_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise ConversionError(f"{src} has no config.json")
    config = json.loads(path.read_text())
    if config.get("model_type") not in FRAMEWORK_OF:
        raise ConversionError(f"{path}: model_type {config.get('model_type')!r} is not a release model type "
                              f"({', '.join(FRAMEWORK_OF)})")
    if not config.get("mask_num"):
        raise ConversionError(f"{path}: mask_num (object tokens per object) is missing")
    return config


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialization cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConversionError(f"{path.name} is not a plain tensor state dict; refusing to unpickle it: {exc}") from exc


def load_release_weights(src: Path) -> dict[str, torch.Tensor]:
    """All release tensors by name, from a single file or from shards listed in an index json."""
    name = next((n for n in WEIGHT_FILES if (src / n).is_file()), None)
    if name is None:
        raise ConversionError(f"{src} holds none of {', '.join(WEIGHT_FILES)}")
    if not name.endswith(".index.json"):
        weights = _load_file(src / name)
    else:
        weight_map = json.loads((src / name).read_text())["weight_map"]
        weights = {}
        for shard in sorted(set(weight_map.values())):
            weights.update(_load_file(src / shard))
        missing = sorted(set(weight_map) - set(weights))
        if missing:
            raise ConversionError(f"{name} lists tensors that no shard holds: {', '.join(missing)}")
    bad = sorted(k for k, v in weights.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ConversionError(f"{name}: entries that are not tensors: {', '.join(bad)}")
    return weights


# ----------------------------------------------------------------------------- key map


def map_keys(names) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Release names -> {release: (part, ours)} and the unused ones; any other name is an error."""
    mapping, unused, unknown = {}, [], []
    for name in sorted(names):
        rule = next(((part, m, template) for part, regex, template in KEY_RULES
                     if (m := re.fullmatch(regex, name))), None)
        if rule is not None:
            mapping[name] = (rule[0], rule[1].expand(rule[2]))
        elif any(re.fullmatch(regex, name) for regex in UNUSED_RULES):
            unused.append(name)
        else:
            unknown.append(name)
    if unknown:
        raise ConversionError(f"{len(unknown)} release tensors match no rule of the key map: {', '.join(unknown)}")
    return mapping, unused


def expected_tensors(config: PixelReferConfig) -> dict[str, torch.Size]:
    """Our checkpoint's tensors and shapes (tied duplicates left out), from a model on the meta device."""
    with torch.device("meta"):
        model = PixelReferForConditionalGeneration(config)
    tied = set(dict(model.named_parameters(remove_duplicate=False))) - set(dict(model.named_parameters()))
    return {name: t.shape for name, t in model.state_dict().items() if name not in tied}


def check_mapping(mapping, weights, expected) -> None:
    """Every tensor of ours has exactly one source of the right shape, and every source has a place."""
    targets: dict[str, list[str]] = {}
    for release, (_, ours) in mapping.items():
        targets.setdefault(ours, []).append(release)
    problems = []
    if stray := sorted(r for r, (_, ours) in mapping.items() if ours not in expected):
        problems.append("release tensors with no place in our model: "
                        + ", ".join(f"{r} -> {mapping[r][1]}" for r in stray))
    if missing := sorted(set(expected) - set(targets)):
        problems.append("tensors of our model without a source: " + ", ".join(missing))
    if doubles := sorted(o for o, sources in targets.items() if len(sources) > 1):
        problems.append("tensors of our model with several sources: "
                        + ", ".join(f"{o} <- {targets[o]}" for o in doubles))
    problems += [f"shape mismatch: {r} {tuple(weights[r].shape)} -> {ours} expects {tuple(expected[ours])}"
                 for r, (_, ours) in sorted(mapping.items())
                 if ours in expected and weights[r].shape != expected[ours]]
    if problems:
        raise ConversionError("\n".join(problems))


# ----------------------------------------------------------------------------- config


def _vision_config(release: dict, weights: dict[str, torch.Tensor], notes: list[str]) -> dict:
    """Vision sizes: `vision_encoder_config` when the release has it, else read off the tensors."""
    prefix = "model.vision_encoder.vision_encoder."
    patch = weights.get(prefix + "embeddings.patch_embedding.weight")
    if patch is None:
        raise ConversionError(f"release has no {prefix}embeddings.patch_embedding.weight")
    layers = {int(m.group(1)) for k in weights if (m := re.match(_VISION + r"encoder\.layers\.(\d+)\.", k))}
    fc1 = weights.get(prefix + "encoder.layers.0.mlp.fc1.weight")
    given = release.get("vision_encoder_config") or {}
    vision = dict(hidden_size=patch.shape[0], num_channels=patch.shape[1], patch_size=patch.shape[-1],
                  num_hidden_layers=max(layers) + 1 if layers else 0,
                  intermediate_size=fc1.shape[0] if fc1 is not None else None,
                  hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    vision.update({k: given[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads", "patch_size", "layer_norm_eps") if k in given})
    if "num_attention_heads" not in vision:
        siglip = preset_kwargs("2b")["vision_config"]
        if vision["hidden_size"] != siglip["hidden_size"]:
            raise ConversionError("config.json has no vision_encoder_config.num_attention_heads and the vision "
                                  f"width {vision['hidden_size']} is not VL3-SigLIP-NaViT's {siglip['hidden_size']}")
        vision["num_attention_heads"] = siglip["num_attention_heads"]
        notes.append(f"vision heads not in config.json: took VL3-SigLIP-NaViT's {siglip['num_attention_heads']}")
    if release.get("mm_hidden_size", vision["hidden_size"]) != vision["hidden_size"]:
        raise ConversionError(f"mm_hidden_size {release['mm_hidden_size']} differs from the vision encoder's "
                              f"width {vision['hidden_size']}")
    return vision


def _text_config(release: dict, vocab_size: int, tie: bool, pad_token_id: int | None) -> dict:
    text = {k: release[k] for k in _TEXT_KEYS if k in release}
    rope = {"rope_type": "default", "rope_theta": float(release.get("rope_theta", 10000.0))}
    if release.get("rope_scaling"):
        scaling = release["rope_scaling"]
        rope.update(scaling, rope_type=scaling.get("rope_type", scaling.get("type", "default")))
    return dict(text, model_type="qwen2", rope_parameters=rope, vocab_size=vocab_size, tie_word_embeddings=tie,
                pad_token_id=pad_token_id)


def build_config(release: dict, weights: dict[str, torch.Tensor], tokenizer, tie: bool, notes: list[str]):
    """Our `PixelReferConfig` for the release: its sizes, its tokenizer's ids, its constants and quirks."""
    rows = weights["model.embed_tokens.weight"].shape[0]
    config = PixelReferConfig(
        text_config=_text_config(release, rows, tie, tokenizer.pad_token_id),
        vision_config=_vision_config(release, weights, notes),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        region_token_id=tokenizer.convert_tokens_to_ids("<REGION>"),
        tie_word_embeddings=tie,
        **release_settings(release),
    )
    for key, token in (("image_token_index", "<image>"), ("region_token_index", "<REGION>")):
        if key in release and release[key] != tokenizer.convert_tokens_to_ids(token):
            notes.append(f"config.json {key}={release[key]} but the tokenizer maps {token} to "
                         f"{tokenizer.convert_tokens_to_ids(token)}; the tokenizer wins, as in the release's inference")
    return config


def release_settings(release: dict) -> dict:
    """Our config fields for the release's constants and quirks (REFERENCE §1–4)."""
    framework = FRAMEWORK_OF[release["model_type"]]
    lite = framework == "object_only"
    settings = dict(
        framework=framework,
        num_object_tokens=int(release["mask_num"]),
        downscale_threshold=50 if lite else 100,
        kmeans_iterations=3 if lite else 5,
        context_padding_patches=2,
        oci_local_size=224,
        oci_global_size=336,
        oci_num_heads=8,
        video_merge_size=int(release.get("spatial_merge_size", 2)),
        video_compression_threshold=0.1 if release.get("use_token_compression", True) else None,
        release_swapped_position_axes=True,
        release_variable_token_count=not lite,
        release_prompt_format=True,
    )
    if release.get("mm_max_length"):  # the release's image budget: mm_max_length patches at merge 1
        settings["image_max_pixels"] = int(release["mm_max_length"]) * 14 * 14
    return settings


# ----------------------------------------------------------------------------- tokenizer and vocabulary


def prepare_tokenizer(src: Path, out: Path, notes: list[str]):
    """Copy the tokenizer files to `out`, add the special tokens it lacks; return (tokenizer, added)."""
    copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not copied:
        raise ConversionError(f"{src} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    for name in copied:
        shutil.copy2(src / name, out / name)
    tokenizer = AutoTokenizer.from_pretrained(out)
    vocab = tokenizer.get_vocab()
    added = [t for t in (*CHAT_TOKENS, *RELEASE_ADDED_TOKENS, *OUR_TOKENS) if t not in vocab]
    if added:
        tokenizer.add_tokens(added, special_tokens=True)
    if missing_chat := [t for t in CHAT_TOKENS if t in added]:
        notes.append(f"the tokenizer lacked the chat tokens {', '.join(missing_chat)}: added with untrained rows")
    no_pad = tokenizer.pad_token is None
    if no_pad:  # the processor left-pads batches
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in vocab else tokenizer.unk_token
        notes.append(f"tokenizer had no pad token: using {tokenizer.pad_token}")
    if added or no_pad or "tokenizer.json" not in copied:
        tokenizer.save_pretrained(out)
    return tokenizer, added


def grow_vocabulary(weights: dict[str, torch.Tensor], rows: int) -> tuple[int, int] | None:
    """Give token ids up to `rows` an embedding (and head) row: the mean of the existing rows."""
    before = weights["model.embed_tokens.weight"].shape[0]
    if rows <= before:
        return None
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in weights:
            table = weights[name]
            mean = table.float().mean(0, keepdim=True).to(table.dtype)
            weights[name] = torch.cat([table, mean.expand(rows - before, -1)])
    return before, rows


def _ties(release: dict, weights: dict[str, torch.Tensor], notes: list[str]) -> bool:
    tie = bool(release.get("tie_word_embeddings", False))
    head, embed = weights.get("lm_head.weight"), weights["model.embed_tokens.weight"]
    if tie and head is not None and not torch.equal(head, embed):
        notes.append("tie_word_embeddings is set but lm_head.weight differs from the embedding: kept both, untied")
        return False
    return tie


# ----------------------------------------------------------------------------- writing


def _unique_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, none sharing storage (safetensors refuses aliases)."""
    seen, out = set(), {}
    for name, tensor in state.items():
        tensor = tensor.contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out


def _check_destination(dst: Path, overwrite: bool) -> bool:
    """True when `dst` holds something that `overwrite` allows us to replace."""
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"{dst} exists and is not a folder")
    occupied = dst.is_dir() and any(dst.iterdir())
    if occupied and not overwrite:
        raise ConversionError(f"{dst} exists and is not empty (pass overwrite=True / --overwrite)")
    return occupied


def _replace_atomically(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Rename the finished `tmp` to `dst`; an old `dst` is moved aside first and restored on failure."""
    if not _check_destination(dst, overwrite):
        os.replace(tmp, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except OSError:
        os.replace(old, dst)
        raise
    shutil.rmtree(old)


def convert_release(src, dst, *, overwrite: bool = False, max_shard_size: int | str = "5GB") -> ConversionReport:
    """Convert a released PixelRefer / PixelRefer-Lite folder into a checkpoint `pixelrefer.load(dst)` opens.

    Args:
        src: the downloaded release folder (config.json, weights, tokenizer files).
        dst: the folder to write (safetensors weights, config.json, tokenizer files, conversion.json).
        overwrite: replace a non-empty `dst`.
        max_shard_size: larger checkpoints are split into shards with an index json.

    Raises:
        ConversionError: unreadable release, unmapped or missing tensors, shape mismatches.
    """
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if not src.is_dir():
        raise ConversionError(f"{src} is not a folder")
    _check_destination(dst, overwrite)  # fail before the expensive part
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        report = _convert_into(src, tmp, dst, max_shard_size)
        (tmp / "conversion.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
        _replace_atomically(tmp, dst, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _convert_into(src: Path, out: Path, dst: Path, max_shard_size) -> ConversionReport:
    """Write the converted checkpoint into `out` (the temporary folder that becomes `dst`)."""
    notes: list[str] = []
    release = read_release_config(src)
    weights = load_release_weights(src)
    mapping, unused = map_keys(weights)
    if "model.embed_tokens.weight" not in weights:
        raise ConversionError("release has no model.embed_tokens.weight")
    tokenizer, added = prepare_tokenizer(src, out, notes)
    tie = _ties(release, weights, notes)
    resize = grow_vocabulary(weights, len(tokenizer))
    config = build_config(release, weights, tokenizer, tie, notes)
    expected = expected_tensors(config)
    if tie and "lm_head.weight" in mapping:
        unused.append("lm_head.weight (tied to model.embed_tokens.weight)")
        del mapping["lm_head.weight"]
    check_mapping(mapping, weights, expected)
    state = _unique_storage({ours: weights[release_name] for release_name, (_, ours) in mapping.items()})
    save_torch_state_dict(state, out, max_shard_size=max_shard_size)
    config.save_pretrained(out)
    mapped = dict(Counter(part for part, _ in mapping.values()))
    settings = release_settings(release)
    return ConversionReport(str(src), str(dst), config.framework, mapped, unused, added, resize, settings, notes)


# ----------------------------------------------------------------------------- command line


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Register `pixelrefer convert SRC DST [--overwrite]`."""
    parser = commands.add_parser("convert", help="convert a released PixelRefer / PixelRefer-Lite checkpoint")
    parser.add_argument("src", help="the downloaded release folder (e.g. PixelRefer-2B)")
    parser.add_argument("dst", help="the folder to write; pixelrefer.load(DST) opens it")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.set_defaults(handler=_convert_command)


def _convert_command(args: argparse.Namespace) -> int:
    try:
        report = convert_release(args.src, args.dst, overwrite=args.overwrite)
    except ConversionError as exc:
        print(f"pixelrefer convert: error: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0
