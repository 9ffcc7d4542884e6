"""Loss primitives for PKS-style referring segmentation, one module a family.

* `heatmap`: CenterNet's heatmap target and focal loss, and the box L1.
* `masks`: Dice and BCE mask losses and the ground-truth pooling.
* `boxinst`: BoxInst's projection and pairwise colour losses, and the
  click terms (centre point, outside the box).
* `sag`: Shatter and Gather's C^3 and reconstruction losses.
* `weighting`: the warm-up ramp and the weighted sum of terms.

The supervision-specific compositions of these terms live in the task
modules.
"""
