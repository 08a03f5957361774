"""SPARQ: synthetic problem generation for reasoning via quality-diversity (thesis 4.3).

Importing the package registers its strategies ("strategy"), filters ("filter") and the lab's
oracle annotator ("annotator") in `qdc_jax.registry`.
"""

from qdc_jax.sparq import archive  # noqa: F401
from qdc_jax.sparq import filters  # noqa: F401
from qdc_jax.sparq import metrics  # noqa: F401
from qdc_jax.sparq import prompts  # noqa: F401
from qdc_jax.sparq import quality  # noqa: F401
from qdc_jax.sparq import skills  # noqa: F401
from qdc_jax.sparq import strategies  # noqa: F401
