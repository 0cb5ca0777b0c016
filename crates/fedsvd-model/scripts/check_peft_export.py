#!/usr/bin/env python3
"""Checks a fedsvd export against PyTorch: loads it the way a PyTorch user
would and compares the logits with fedsvd's.

A PEFT adapter (a folder with adapter_config.json):

    PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=N), ADAPTER_DIR)

A merged checkpoint (a folder with config.json + model.safetensors):

    BertForSequenceClassification.from_pretrained(DIR)

fedsvd's logits come from a JSON file with {"predictions": [{"text", "logits",
"input_ids"?}, ...]} -- what `fedsvd predict --json` prints and what the
`peft_export` example writes. The texts are taken from it, tokenized with the
model's tokenizer.json (truncated to --max-len, or the file's "max_len"), and
the token ids are compared too when the file has them.

    python check_peft_export.py --export DIR --ours ours.json [--model MODEL_DIR] [--tol 1e-4]

Exit status 0 when max |logit difference| <= tol, 1 otherwise. Needs torch,
transformers, peft and tokenizers; not used by cargo tests.
"""

import argparse
import json
import os
import sys

import torch
from tokenizers import Tokenizer
from transformers import BertForSequenceClassification


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
    if is_adapter:
        from peft import PeftModel

        with open(os.path.join(args.export, "adapter_config.json")) as f:
            cfg = json.load(f)
        model_dir = args.model or cfg["base_model_name_or_path"]
        num_labels = len(preds[0]["logits"])
        base = BertForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
        model = PeftModel.from_pretrained(base, args.export)
        tok_dir = model_dir
    else:
        model = BertForSequenceClassification.from_pretrained(args.export)
        tok_dir = args.export
    model.eval()
    tok = Tokenizer.from_file(args.tokenizer or os.path.join(tok_dir, "tokenizer.json"))
    tok.enable_truncation(max_len)
    tok.no_padding()

    worst = 0.0
    ids_ok = True
    for p, text in zip(preds, texts):
        enc = tok.encode(text)
        if "input_ids" in p and list(p["input_ids"]) != list(enc.ids):
            ids_ok = False
            print(f"token ids differ for {text!r}: fedsvd {p['input_ids']} vs {enc.ids}")
        ids = torch.tensor([enc.ids])
        with torch.no_grad():
            logits = model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                token_type_ids=torch.tensor([enc.type_ids]),
            ).logits[0]
        theirs = logits.double().tolist()
        diff = max(abs(a - b) for a, b in zip(p["logits"], theirs))
        worst = max(worst, diff)
        print(f"{text[:48]!r:52} torch {[round(x, 6) for x in theirs]}  max|diff| {diff:.3e}")

    kind = "adapter (PeftModel)" if is_adapter else "merged checkpoint"
    print(f"{kind}: {len(preds)} texts, max |logit difference| = {worst:.3e} (tolerance {args.tol:g})")
    ok = worst <= args.tol and ids_ok
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
