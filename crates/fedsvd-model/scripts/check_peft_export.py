#!/usr/bin/env python3
"""Checks a fedsvd export against PyTorch: loads it the way a PyTorch user
would and compares the logits with fedsvd's.

The export's head decides how (read from fedsvd_adapter.json's "pooling",
else from adapter_config.json's task_type or config.json's architectures):

[CLS]-pooler head, PEFT adapter (task SEQ_CLS):

    PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=N), ADAPTER_DIR)

[CLS]-pooler head, merged checkpoint (architectures BertForSequenceClassification):

    BertForSequenceClassification.from_pretrained(DIR)

Mean-pooling head, PEFT adapter (task FEATURE_EXTRACTION) or merged
checkpoint (architectures BertModel), each with head.safetensors:

    enc = PeftModel.from_pretrained(BertModel.from_pretrained(MODEL_DIR), ADAPTER_DIR)  # or
    enc = BertModel.from_pretrained(DIR)
    head = torch.nn.Linear(hidden, N)
    head.load_state_dict(safetensors.torch.load_file(DIR + "/head.safetensors"))
    h = enc(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    logits = head((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))

fedsvd's logits come from a JSON file with {"predictions": [{"text", "logits",
"input_ids"?}, ...]} -- what `fedsvd predict --json` prints and what the
`peft_export` example writes. The texts are taken from it, tokenized with the
model's tokenizer.json (truncated to --max-len, or the file's "max_len"), run
as one padded batch (so the attention mask matters), and the token ids are
compared too when the file has them. For an adapter, the LoRA factors PEFT
loaded are compared with the file (a misnamed tensor would leave a factor at
its initial value), and a state whose B factors are all zero is refused: the
check would then not test the adapter.

    python check_peft_export.py --export DIR --ours ours.json [--model MODEL_DIR] [--tol 1e-4]

Exit status 0 when max |logit difference| <= tol, 1 otherwise. Needs torch,
transformers, peft, safetensors and tokenizers; not used by cargo tests.
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import BertForSequenceClassification, BertModel


def read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def detect_pooling(export, is_adapter):
    """The head's pooling, from the files: "cls_pooler" or "mean"."""
    sidecar = read_json(os.path.join(export, "fedsvd_adapter.json"))
    if is_adapter:
        task = read_json(os.path.join(export, "adapter_config.json")).get("task_type")
        from_hf = {"SEQ_CLS": "cls_pooler", "FEATURE_EXTRACTION": "mean"}.get(task)
        what = f"task_type {task}"
    else:
        arch = (read_json(os.path.join(export, "config.json")).get("architectures") or [None])[0]
        from_hf = {"BertForSequenceClassification": "cls_pooler", "BertModel": "mean"}.get(arch)
        what = f"architectures [{arch}]"
    from_sidecar = sidecar.get("pooling") if sidecar else None
    if from_hf and from_sidecar and from_hf != from_sidecar:
        sys.exit(f"{export}: fedsvd_adapter.json says pooling {from_sidecar}, {what} implies {from_hf}")
    pooling = from_sidecar or from_hf
    if pooling is None:
        sys.exit(f"{export}: cannot tell the head's pooling ({what}, no fedsvd_adapter.json)")
    return pooling


def check_loaded_adapter(model, export):
    """Compares the adapter tensors PEFT holds with the file; refuses an all-zero B."""
    from peft import get_peft_model_state_dict

    saved = load_file(os.path.join(export, "adapter_model.safetensors"))
    live = get_peft_model_state_dict(model)
    missing = sorted(set(saved) - set(live))
    extra = sorted(set(live) - set(saved))
    if missing or extra:
        sys.exit(f"PEFT did not load the file as saved: not loaded {missing[:4]}, not in file {extra[:4]}")
    for k, v in saved.items():
        if not torch.equal(live[k].detach().cpu(), v):
            sys.exit(f"PEFT holds other values for {k} than the file")
    b_max = max((v.abs().max().item() for k, v in saved.items() if ".lora_B." in k), default=0.0)
    print(f"adapter: {len(saved)} tensors loaded by PEFT as saved; max |B| = {b_max:.4g}")
    if b_max == 0.0:
        sys.exit("every B factor is zero: the adapter changes nothing, so the check would not test it")


def load_head(export, hidden):
    path = os.path.join(export, "head.safetensors")
    state = load_file(path)
    num_labels = state["weight"].shape[0]
    head = torch.nn.Linear(hidden, num_labels)
    head.load_state_dict(state)  # strict: exactly `weight` and `bias`
    head.eval()
    print(f"head: {path} [{num_labels}, {hidden}], max |weight| = {state['weight'].abs().max().item():.4g}")
    return head


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", required=True, help="adapter folder or merged checkpoint folder")
    ap.add_argument("--ours", required=True, help="fedsvd's logits (JSON, see above)")
    ap.add_argument("--model", help="base model folder for an adapter (default: its base_model_name_or_path)")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: in the base model / merged folder)")
    ap.add_argument("--max-len", type=int, help="truncation length (default: the JSON's max_len, else 128)")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest allowed |difference| (default 1e-4)")
    args = ap.parse_args()

    with open(args.ours) as f:
        ours = json.load(f)
    preds = ours["predictions"]
    texts = [p["text"] for p in preds]
    max_len = args.max_len or ours.get("max_len") or 128

    torch.manual_seed(0)
    is_adapter = os.path.isfile(os.path.join(args.export, "adapter_config.json"))
    pooling = detect_pooling(args.export, is_adapter)
    mean = pooling == "mean"
    num_labels = len(preds[0]["logits"])
    if is_adapter:
        from peft import PeftModel

        cfg = read_json(os.path.join(args.export, "adapter_config.json"))
        model_dir = args.model or cfg["base_model_name_or_path"]
        if mean:
            base = BertModel.from_pretrained(model_dir)
        else:
            base = BertForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
        model = PeftModel.from_pretrained(base, args.export)
        check_loaded_adapter(model, args.export)
        tok_dir = model_dir
    else:
        cls = BertModel if mean else BertForSequenceClassification
        model = cls.from_pretrained(args.export)
        tok_dir = args.export
    model.eval()
    head = load_head(args.export, model.config.hidden_size) if mean else None
    tok = Tokenizer.from_file(args.tokenizer or os.path.join(tok_dir, "tokenizer.json"))
    tok.enable_truncation(max_len)
    tok.no_padding()

    encs = [tok.encode(t) for t in texts]
    ids_ok = True
    for p, text, enc in zip(preds, texts, encs):
        if "input_ids" in p and list(p["input_ids"]) != list(enc.ids):
            ids_ok = False
            print(f"token ids differ for {text!r}: fedsvd {p['input_ids']} vs {enc.ids}")
    # One batch padded to the longest text: padding must not change the logits.
    width = max(len(e.ids) for e in encs)
    pad = lambda xs: list(xs) + [0] * (width - len(xs))  # noqa: E731
    ids = torch.tensor([pad(e.ids) for e in encs])
    types = torch.tensor([pad(e.type_ids) for e in encs])
    mask = torch.tensor([pad([1] * len(e.ids)) for e in encs])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
        if mean:
            h = out.last_hidden_state
            m = mask.to(h.dtype)
            pooled = (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
            logits = head(pooled)
        else:
            logits = out.logits

    worst = 0.0
    for p, text, row in zip(preds, texts, logits):
        theirs = row.double().tolist()
        diff = max(abs(a - b) for a, b in zip(p["logits"], theirs))
        worst = max(worst, diff)
        print(f"{text[:48]!r:52} torch {[round(x, 6) for x in theirs]}  max|diff| {diff:.3e}")

    if is_adapter:
        kind = "adapter (PeftModel on BertModel, mean pooling)" if mean else "adapter (PeftModel on BertForSequenceClassification)"
    else:
        kind = "merged checkpoint (BertModel, mean pooling)" if mean else "merged checkpoint (BertForSequenceClassification)"
    print(f"{kind}: {len(preds)} texts, max |logit difference| = {worst:.3e} (tolerance {args.tol:g})")
    ok = worst <= args.tol and ids_ok
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
