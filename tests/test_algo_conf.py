"""Every conf/algo/*.yaml fits the AlgoConfig schema and names registered functions."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from rlhf.algo import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from rlhf.config import AlgoConfig

CONF = Path(__file__).resolve().parents[1] / "conf" / "algo"
FILES = sorted(CONF.glob("*.yaml"))


def _compose(path: Path):
    raw = OmegaConf.load(path)
    # hydra resolves the defaults list; here the schema merge alone checks keys and types.
    assert list(raw.pop("defaults")) == ["base_algo", "_self_"], path.name
    return OmegaConf.merge(OmegaConf.structured(AlgoConfig), raw)


def test_every_variant_has_a_file():
    names = {p.stem for p in FILES}
    assert {"grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_conf_uses_registered_names(path):
    cfg = _compose(path)
    assert cfg.advantage in ADVANTAGES
    assert cfg.policy_loss in POLICY_LOSSES
    assert cfg.loss_agg in AGGREGATIONS
    assert cfg.kl_estimator in KL_ESTIMATORS
    assert cfg.clip_low > 0 and cfg.clip_high > 0


def test_a_misspelt_key_fails_the_merge():
    with pytest.raises(ConfigKeyError, match="advantge"):
        OmegaConf.merge(OmegaConf.structured(AlgoConfig), {"advantge": "grpo"})


def test_variant_specifics():
    dapo, gspo, dr = (_compose(CONF / f"{n}.yaml") for n in ("dapo", "gspo", "dr_grpo"))
    assert (dapo.clip_low, dapo.clip_high, dapo.loss_agg) == (0.2, 0.28, "token_mean")
    assert dapo.dynamic_sampling is True
    assert (gspo.policy_loss, gspo.clip_low, gspo.clip_high) == ("gspo", 3e-4, 4e-4)
    assert (dr.advantage, dr.loss_agg) == ("dr_grpo", "seq_mean_token_sum_norm")
