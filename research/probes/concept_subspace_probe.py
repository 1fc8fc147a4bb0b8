"""The nullspace lever, explained without training: how much of what tells the protected concepts apart (the
between-concept scatter of the illegal captions' token embeddings) lies in the token-selective subspace that
`immunise` and `nullspace` use, and how much legal energy a subspace that held it would take.
A research script, run from the repository root. usage: concept_subspace_probe.py RELEASE_DIR
(RELEASE_DIR: a bench run's relearn release, e.g. runs/attacks/relearn/figures-seed0/release).
Figures seed 0: the rank-8 subspace holds 4% of the between-concept energy (0.7% of the illegal energy); the 8
directions that hold 92% of it also hold 67% of the legal energy and 78% of the empty prompt's."""

import sys

import torch

from freezeasguard.bench import emoji
from freezeasguard.model import DiffusionModel
from freezeasguard.protections.immunise import illegal_text_subspace

torch.set_num_threads(1)
sc = emoji.scenario("figures", 0)
m = DiffusionModel.from_pretrained(sys.argv[1], torch_dtype=torch.float32)
ill = [it.caption for it in sc.items("illegal", "publisher")]
leg = [it.caption for d in ("legal_near", "legal_far") for it in sc.items(d, "publisher")]
print(len(ill), len(leg), ill[:3], list(sc.illegal)[:6])
with torch.no_grad():
    ei, el, e0 = m.encode_prompts(ill), m.encode_prompts(leg), m.encode_prompts([""])
# concept of each illegal caption: the illegal family word it contains
fams = list(sc.illegal)
lab = [next(i for i, f in enumerate(fams) if f in c) for c in ill]
lab = torch.tensor(lab)
D = ei.shape[-1]
# between-concept scatter per token position, summed
means = torch.stack([ei[lab == k].mean(0) for k in range(len(fams))])  # [K, T, D]
diff = (means - means.mean(0, keepdim=True)).reshape(-1, D).double()
total_between = diff.pow(2).sum()
for rank in (4, 8, 12, 16, 20):
    try:
        P, info = illegal_text_subspace(ei, el, rank, keep=e0)
    except ValueError as e:
        print(rank, e)
        continue
    P = P.double()
    print(
        f"rank {rank}: between-concept energy in P {float((diff @ P).pow(2).sum() / total_between):.3f}; "
        f"illegal share {info['illegal_energy_share']:.4f} legal share {info['legal_energy_share']:.4f}"
    )
# the between-concept subspace itself (PCA of diff), and the legal energy it would hold
_, s, vh = torch.linalg.svd(diff, full_matrices=False)
el2 = el.reshape(-1, D).double()
ei2 = ei.reshape(-1, D).double()
for r in (2, 4, 8, 12, 16):
    P = vh[:r].T @ vh[:r]
    print(
        f"between-concept PCA rank {r}: between energy {float((diff @ P).pow(2).sum() / total_between):.3f}, "
        f"legal share {float((el2 @ P).pow(2).sum() / el2.pow(2).sum()):.4f}, illegal share {float((ei2 @ P).pow(2).sum() / ei2.pow(2).sum()):.4f}, "
        f"empty share {float((e0.reshape(-1, D).double() @ P).pow(2).sum() / e0.double().pow(2).sum()):.5f}"
    )
