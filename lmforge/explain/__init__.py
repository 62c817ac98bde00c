"""Explanations of a run's answers: which inputs (tokens, pixels) a prediction rests on.

``subjects.py`` turns an input and a run into a :class:`~lmforge.explain.attribution.Subject`
(the model input, its "feature absent" baseline, the features and the explained score);
``attribution.py`` runs Captum's methods on any subject; ``lmforge.evaluate.faithfulness``
measures how far each method's ranking is to be trusted; ``render.py`` writes the HTML page,
heat maps, attention maps, curves and the report; ``attention.py`` reads a decoder's attention
weights on demand.
"""

METHODS = ("ig", "occlusion", "shap")  # the attribution methods (attribution.py), in the order they are run
