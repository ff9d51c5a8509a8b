import pandas as pd
import pytest
import torch

from securetune.probe import accuracy_table, fit_probes, proxy_layers


def _separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two layers: layer 0 is noise, layer 1 separates the classes along one direction."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    noise = torch.randn(2, n, 8, generator=gen)
    noise[1, :, 3] += 4.0 * (2 * labels - 1)
    return noise, labels


def test_probe_learns_separable_layer_and_not_noise():
    train, y_train = _separable(80, 0)
    test, y_test = _separable(80, 1)
    probes = fit_probes(train, y_train, c=1.0, seed=0)
    table = accuracy_table(probes, train, y_train, test, y_test)
    assert table.loc[1, "test_accuracy"] >= 0.95
    assert table.loc[0, "test_accuracy"] <= 0.75
    assert proxy_layers("best", table, 2) == [1]


def test_torch_scoring_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train, y = _separable(60, 2)
    probes = fit_probes(train, y, c=0.5, seed=0)
    x = train[1].double().numpy()
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=0.5, max_iter=2000, random_state=0).fit(scaler.transform(x), y)
    expected = clf.decision_function(scaler.transform(x))
    ours = probes.logits(train[1:2], [1])[0].numpy()
    assert ours == pytest.approx(expected, abs=1e-4)


def test_proxy_layer_choices():
    table = pd.DataFrame({"layer": [0, 1, 2], "test_accuracy": [0.7, 0.9, 0.9]})
    assert proxy_layers("best", table, 3) == [1]
    assert proxy_layers("last", table, 3) == [2]
    assert proxy_layers("all", table, 3) == [0, 1, 2]
    assert proxy_layers([2, 0], table, 3) == [0, 2]
    with pytest.raises(ValueError, match="outside 0..2"):
        proxy_layers([3], table, 3)
