"""Model-from-code entry point of the registered pyfunc (MLflow copies this file into the model)."""

from mlflow.models import set_model

from subjectops.tracking.pyfunc import PersonalizedDiffusion

set_model(PersonalizedDiffusion())
