from kakusan.data import load_digits
from kakusan.demo import digit_classifier, judge_digits, run_demo


def test_the_judge_reads_the_real_digits_and_not_wrong_labels():
    """The demo's judge, given the real digits in the samples' [-1, 1] form: nearly all read as their labels
    (it was fit on them), almost none as the next digit; its held-out accuracy is the README's ~99%."""
    data = load_digits()
    x = data.images.float() / 127.5 - 1.0
    clf, held_out = digit_classifier()
    assert 0.97 < held_out < 1.0
    assert judge_digits(x, data.labels, clf) > 0.99
    assert judge_digits(x, (data.labels + 1) % 10) < 0.05


def test_the_demo_runs_end_to_end_and_says_what_it_sampled_with(tmp_path):
    """A 30-step demo: a grid, a checkpoint, and a judged share; sampled with the default solver (unipc-2, 20
    steps) unless told otherwise."""
    r = run_demo(tmp_path / "demo", steps=30, progress=False)
    assert (r["steps"], r["sampler"], r["sample_steps"]) == (30, "unipc-2", 20)
    assert (tmp_path / "demo" / "demo-grid.png").is_file()
    assert 0.0 <= r["agreement"] <= 1.0 and r["train_s"] > 0 and r["sample_s"] > 0
    r2 = run_demo(tmp_path / "demo2", steps=2, progress=False, sampler="ddim", sample_steps=5)
    assert (r2["sampler"], r2["sample_steps"]) == ("ddim", 5)
