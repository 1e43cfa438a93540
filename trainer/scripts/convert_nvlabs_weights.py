#!/usr/bin/env python3
"""Converts original NVlabs SegFormer weights to the HuggingFace key names segtrain loads.

Inputs (PyTorch pickles):
  * ImageNet encoder weights `mit_bX.pth`: a plain state dict, backbone keys without a prefix plus
    the ImageNet `head.*` classifier;
  * segmentation checkpoints `segformer.bX.*.pth`: {"state_dict": {"backbone.*", "decode_head.*"}, ...}.

Output: a safetensors file with HuggingFace `SegformerForSemanticSegmentation` keys, loadable with
`segtrain-worker predict --weights` or the job spec's `pretrained`. An encoder-only file loads into
the encoder and leaves the decode head freshly initialised.

Key mapping (docs/recipe.md §2.3, from HF's convert_segformer_original_to_pytorch.py):
  backbone. / (none)                 -> segformer.encoder.
  patch_embed{n}.proj / .norm        -> patch_embeddings.{n-1}.proj / .layer_norm
  block{n}.{j}.norm1 / norm2         -> block.{n-1}.{j}.layer_norm_1 / layer_norm_2
  attn.q                             -> attention.self.query
  attn.kv (rows [0:C] / [C:2C])      -> attention.self.key / attention.self.value (weight and bias)
  attn.proj                          -> attention.output.dense
  attn.sr / attn.norm                -> attention.self.sr / attention.self.layer_norm
  mlp.fc1 / mlp.fc2                  -> mlp.dense1 / mlp.dense2 (mlp.dwconv.dwconv unchanged)
  norm{n}                            -> layer_norm.{n-1}
  decode_head.linear_c{n}.proj       -> decode_head.linear_c.{n-1}.proj
  decode_head.linear_fuse.conv / .bn -> decode_head.linear_fuse / decode_head.batch_norm
  decode_head.linear_pred            -> decode_head.classifier
  decode_head.conv_seg               -> dropped (unused by the SegFormer head)
  head                               -> classifier (the ImageNet classifier; dropped on load)

Usage: python3 convert_nvlabs_weights.py mit_b3.pth mit_b3.safetensors
       (with the torch venv `make setup` creates: ~/.cache/segtrain/torch-2.11.0-venv/bin/python)
"""
import ctypes
import json
import re
import struct
import sys

import torch

RULES = [
    (r"^patch_embed(\d)\.proj\.", lambda m: f"patch_embeddings.{int(m[1]) - 1}.proj."),
    (r"^patch_embed(\d)\.norm\.", lambda m: f"patch_embeddings.{int(m[1]) - 1}.layer_norm."),
    (r"^block(\d)\.(\d+)\.", lambda m: f"block.{int(m[1]) - 1}.{m[2]}."),
    (r"^norm(\d)\.", lambda m: f"layer_norm.{int(m[1]) - 1}."),
]
BLOCK_RENAMES = [
    (".norm1.", ".layer_norm_1."),
    (".norm2.", ".layer_norm_2."),
    (".attn.q.", ".attention.self.query."),
    (".attn.proj.", ".attention.output.dense."),
    (".attn.sr.", ".attention.self.sr."),
    (".attn.norm.", ".attention.self.layer_norm."),
    (".mlp.fc1.", ".mlp.dense1."),
    (".mlp.fc2.", ".mlp.dense2."),
]
HEAD_RENAMES = [
    ("decode_head.linear_fuse.conv.", "decode_head.linear_fuse."),
    ("decode_head.linear_fuse.bn.", "decode_head.batch_norm."),
    ("decode_head.linear_pred.", "decode_head.classifier."),
]


def convert(sd):
    out = {}
    for key, t in sd.items():
        if key.startswith("decode_head."):
            if key.startswith("decode_head.conv_seg."):
                continue
            new = re.sub(r"^decode_head\.linear_c(\d)\.", lambda m: f"decode_head.linear_c.{int(m[1]) - 1}.", key)
            for a, b in HEAD_RENAMES:
                new = new.replace(a, b)
            out[new] = t
            continue
        if key.startswith("head."):
            out["classifier." + key[len("head."):]] = t
            continue
        key = key[len("backbone."):] if key.startswith("backbone.") else key
        new = key
        for pattern, repl in RULES:
            new = re.sub(pattern, repl, new)
        for a, b in BLOCK_RENAMES:
            new = new.replace(a, b)
        new = "segformer.encoder." + new
        if ".attn.kv." in new:
            # The fused kv projection: rows [0:C] are the keys, rows [C:2C] the values.
            c = t.shape[0] // 2
            out[new.replace(".attn.kv.", ".attention.self.key.")] = t[:c]
            out[new.replace(".attn.kv.", ".attention.self.value.")] = t[c:]
        else:
            out[new] = t
    return out


DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def write_safetensors(tensors, path):
    """The safetensors format: u64 header length, JSON header, raw little-endian data."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in DTYPES:
            t = t.float()
        # The raw bytes without numpy (not in the torch venv): x86-64 is little-endian.
        data = ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()) if t.numel() else b""
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)


def main(argv):
    if len(argv) != 3:
        sys.exit(f"usage: {argv[0]} INPUT.pth OUTPUT.safetensors")
    obj = torch.load(argv[1], map_location="cpu", weights_only=True)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
        sys.exit(f"{argv[1]}: not an NVlabs SegFormer state dict")
    out = convert(sd)
    write_safetensors(out, argv[2])
    print(f"wrote {len(out)} tensors to {argv[2]}")


if __name__ == "__main__":
    main(sys.argv)
