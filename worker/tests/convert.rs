//! `trainer/scripts/convert_nvlabs_weights.py`: original NVlabs checkpoints (a segmentation checkpoint with
//! `backbone.`/`decode_head.` keys and a fused `kv`, and an ImageNet `mit_bX.pth`) become files our
//! model loads strictly, with the kv rows split in the right order.

use segtrain_spec::Variant;
use segtrain_trainer::model::weights::{self, CheckpointKind};
use segtrain_trainer::model::{SegFormer, SegFormerConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{nn, Device, Kind, Tensor};

/// The torch venv's python (setup links `.torch` to `<venv>/lib/pythonX.Y/site-packages/torch`).
fn venv_python() -> PathBuf {
    let torch = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.torch");
    let torch = torch
        .canonicalize()
        .expect(".torch exists: run `make setup`");
    let venv = torch.ancestors().nth(4).expect("venv layout");
    venv.join("bin/python")
}

/// HF key -> NVlabs key, written from the NVlabs key list (docs/recipe.md §2.2).
fn nvlabs_name(hf: &str) -> Option<String> {
    if let Some(rest) = hf.strip_prefix("segformer.encoder.") {
        let parts: Vec<&str> = rest.splitn(3, '.').collect();
        let stage = |s: &str| s.parse::<usize>().expect("stage index") + 1;
        return Some(match parts[0] {
            "patch_embeddings" => {
                let tail = parts[2].replacen("layer_norm.", "norm.", 1);
                format!("backbone.patch_embed{}.{tail}", stage(parts[1]))
            }
            "layer_norm" => format!("backbone.norm{}.{}", stage(parts[1]), parts[2]),
            "block" => {
                let (j, tail) = parts[2].split_once('.').expect("block index");
                if tail.starts_with("attention.self.value.") {
                    return None; // fused into kv with the key
                }
                let tail = tail
                    .replace("layer_norm_1.", "norm1.")
                    .replace("layer_norm_2.", "norm2.")
                    .replace("attention.self.query.", "attn.q.")
                    .replace("attention.self.key.", "attn.kv.")
                    .replace("attention.output.dense.", "attn.proj.")
                    .replace("attention.self.sr.", "attn.sr.")
                    .replace("attention.self.layer_norm.", "attn.norm.")
                    .replace("mlp.dense1.", "mlp.fc1.")
                    .replace("mlp.dense2.", "mlp.fc2.");
                format!("backbone.block{}.{j}.{tail}", stage(parts[1]))
            }
            other => panic!("unexpected encoder key {other}"),
        });
    }
    let rest = hf.strip_prefix("decode_head.").expect("decode head key");
    Some(if let Some(r) = rest.strip_prefix("linear_c.") {
        let (s, tail) = r.split_once('.').expect("linear_c index");
        format!(
            "decode_head.linear_c{}.{tail}",
            s.parse::<usize>().expect("index") + 1
        )
    } else if let Some(tail) = rest.strip_prefix("batch_norm.") {
        format!("decode_head.linear_fuse.bn.{tail}")
    } else if rest == "linear_fuse.weight" {
        "decode_head.linear_fuse.conv.weight".to_string()
    } else if let Some(tail) = rest.strip_prefix("classifier.") {
        format!("decode_head.linear_pred.{tail}")
    } else {
        panic!("unexpected head key {rest}")
    })
}

const MAKE_PTH: &str = r#"
import json, sys, torch
shapes = json.load(open(sys.argv[1]))
sd = {}
for name, shape in shapes.items():
    n = 1
    for d in shape:
        n *= d
    if name.endswith("num_batches_tracked"):
        sd[name] = torch.tensor(5)
    else:
        sd[name] = (torch.arange(n, dtype=torch.float32) * 1e-3).reshape(shape)
torch.save({"state_dict": sd, "meta": {"iter": 160000}}, sys.argv[2])
enc = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
enc["head.weight"] = torch.zeros(1000, 256)
enc["head.bias"] = torch.zeros(1000)
torch.save(enc, sys.argv[3])
"#;

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run python");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn convert(python: &Path, from: &Path, to: &Path) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../trainer/scripts/convert_nvlabs_weights.py");
    run(Command::new(python).arg(&script).arg(from).arg(to));
}

#[test]
fn nvlabs_checkpoints_convert_to_files_the_model_loads_strictly() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = SegFormer::new(&vs.root(), SegFormerConfig::variant(Variant::B0, 19));
    let vars = vs.variables();

    let mut shapes: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (hf, t) in &vars {
        if let Some(nv) = nvlabs_name(hf) {
            let mut shape = t.size();
            if nv.contains(".attn.kv.") {
                shape[0] *= 2;
            }
            shapes.insert(nv, shape);
        }
    }
    // What real NVlabs checkpoints also hold.
    shapes.insert("decode_head.conv_seg.weight".into(), vec![19, 128, 1, 1]);
    shapes.insert("decode_head.conv_seg.bias".into(), vec![19]);
    shapes.insert(
        "decode_head.linear_fuse.bn.num_batches_tracked".into(),
        vec![],
    );
    assert!(shapes.contains_key("backbone.block1.0.attn.kv.weight"));

    let dir = tempfile::tempdir().expect("temp dir");
    let manifest = dir.path().join("shapes.json");
    std::fs::write(&manifest, serde_json::to_string(&shapes).expect("json")).expect("write");
    let (seg, mit) = (dir.path().join("seg.pth"), dir.path().join("mit_b0.pth"));
    let python = venv_python();
    run(Command::new(&python)
        .args(["-c", MAKE_PTH])
        .arg(&manifest)
        .arg(&seg)
        .arg(&mit));

    // The segmentation checkpoint: every key of the model, nothing else.
    let seg_out = dir.path().join("seg.safetensors");
    convert(&python, &seg, &seg_out);
    let report =
        weights::load_file(&vs, &seg_out).expect("strict load of the converted checkpoint");
    assert_eq!(report.kind, CheckpointKind::Full);
    assert_eq!(report.loaded, vars.len());
    assert_eq!(
        report.skipped,
        vec!["decode_head.batch_norm.num_batches_tracked".to_string()]
    );

    // kv rows [0:C] are the keys and [C:2C] the values (both weight and bias).
    let c = 64i64; // stage 2 of B0
    let vars = vs.variables();
    let block = "segformer.encoder.block.1.0.attention.self";
    let ramp = |start: i64, n: i64| {
        Tensor::arange_start(start, start + n, (Kind::Float, Device::Cpu)) * 1e-3
    };
    assert!(vars[&format!("{block}.key.weight")].allclose(
        &ramp(0, c * c).view([c, c]),
        1e-6,
        1e-7,
        false
    ));
    assert!(vars[&format!("{block}.value.weight")].allclose(
        &ramp(c * c, c * c).view([c, c]),
        1e-6,
        1e-7,
        false
    ));
    assert!(vars[&format!("{block}.key.bias")].allclose(&ramp(0, c), 1e-6, 1e-7, false));
    assert!(vars[&format!("{block}.value.bias")].allclose(&ramp(c, c), 1e-6, 1e-7, false));

    // The ImageNet encoder file: fills the encoder, its classifier is dropped, the head is kept.
    let mit_out = dir.path().join("mit_b0.safetensors");
    convert(&python, &mit, &mit_out);
    let vs2 = nn::VarStore::new(Device::Cpu);
    let _m2 = SegFormer::new(&vs2.root(), SegFormerConfig::variant(Variant::B0, 19));
    let report = weights::load_file(&vs2, &mit_out).expect("strict encoder-only load");
    assert_eq!(report.kind, CheckpointKind::EncoderOnly);
    assert!(report.skipped.contains(&"classifier.weight".to_string()));
    assert_eq!(
        report.loaded,
        vars.keys()
            .filter(|k| k.starts_with("segformer.encoder."))
            .count()
    );
}
