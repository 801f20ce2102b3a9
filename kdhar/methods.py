"""The training methods by name (a run's `method` tag): what each registers its model as, and how a
report marks it. Plain names only, so the report reads them without importing torch."""

# What a run of each method registers its model as (kdhar-<label>-<arch>), so @champion compares like with like.
REGISTRY_LABELS = {"supervised": "scratch", "kd-logit": "kd", "pcl": "pcl-scratch", "pcl+kd-logit": "pcl-kd",
                   "pcl-ssl": "pretrain", "attention": "attention", "gkd": "gkd", "gkd+kd-logit": "gkd-kd",
                   "kd-feature": "feature-kd",
                   # temporal detection: kdhar-det-<label>-<arch> (kdhar.training.identity.registered_name)
                   "det-supervised": "det-scratch", "det-kd-logit": "det-kd", "det-attention": "det-attention",
                   "det-gkd": "det-gkd"}
# The `method` tag -> its mark in a report row ("c3d [gkd]"), for methods that share a student and
# teacher with logit KD; plain scratch, logit KD and the PCL methods (tables of their own) have none.
REPORT_MARKS = {"attention": "attention", "gkd": "gkd", "gkd+kd-logit": "gkd+logit", "kd-feature": "feature",
                "det-attention": "attention", "det-gkd": "gkd", "det-kd-logit": "score-kd"}
# Methods whose student has GKD's attention module: its own contribution is measured against the
# "scratch + attention" row (the report's "Δ vs scratch + attention"), the teacher's on top of it.
ATTENTION_METHODS = ("attention", "gkd", "gkd+kd-logit")
