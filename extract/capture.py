"""One teacher-forced forward per final sequence, capturing the chosen layers' outputs into a cache Sample."""

import numpy as np
import torch

from cache_schema import Sample
from extract.regenerate import Sequence
from extract.spans import loss_mask
from extract.target import Target


@torch.no_grad()
def capture(target: Target, seq: Sequence, layer_ids: list[int]) -> Sample:
    inputs = {k: v.to(target.device) if torch.is_tensor(v) else v for k, v in seq.inputs.items()}
    positions = target.position_ids(inputs)[:, 0, :]
    with target.capture(layer_ids) as captured:
        target.model(**inputs, use_cache=False, logits_to_keep=1)
    hidden_TLH = torch.stack([captured[i][0] for i in layer_ids], dim=1)
    ids = inputs["input_ids"][0]
    image_ids = target.token_ids(target.traits.chat.expanded)
    n_image = int(sum((ids == v).sum() for v in image_ids)) if image_ids else 0
    # Every count describes the cached sequence; dropped_turns says what of the conversation it left out.
    meta = {"source": seq.conv.source, "num_images": seq.images, "num_image_tokens": n_image,
            "assistant_turns": seq.turns, "truncated_turns": seq.truncated_turns,
            "dropped_turns": seq.dropped_turns, "generated_tokens": seq.generated_tokens}
    return Sample(key=seq.conv.key, input_ids=ids.cpu().numpy().astype(np.int32),
                  loss_mask=loss_mask(ids.shape[0], seq.spans),
                  position_ids=positions.cpu().numpy().astype(np.int32),
                  hidden_TLH=hidden_TLH.to(torch.bfloat16).cpu(), meta=meta)
