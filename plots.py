"""Training curves drawn from the trainer's CSVs, for the trainer's plots/ and the demo's figure.

    read_csv(path) -> list of row dicts ([] when the file does not exist)
    plot_loss(ax, train_rows, test_rows)          train loss per step, test loss per epoch
    plot_metrics(ax, test_rows, curves)           test metrics by epoch
    save_training_plots(output_dir, number_classes)   plots/loss.png and plots/metrics.png
"""
import csv
import os


def read_csv(path):
    """The rows of a CSV file with a header as dicts; [] when the file does not exist."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_loss(ax, train_rows, test_rows):
    """Train loss (train_loss.csv rows) and test loss (test_metrics.csv rows) against the step."""
    ax.plot([int(r["step"]) for r in train_rows], [float(r["loss"]) for r in train_rows], lw=0.8,
            label="train (per step)")
    ax.plot([int(r["step"]) for r in test_rows], [float(r["loss"]) for r in test_rows], "o-",
            label="test (per epoch)")
    losses = [float(r["loss"]) for r in train_rows + test_rows]
    # Early losses can be 100 x the final ones (batch-norm statistics still settling).
    wide = bool(losses) and min(losses) > 0 and max(losses) / min(losses) > 20
    ax.set(xlabel="step", ylabel="loss", yscale="log" if wide else "linear", title="training loss")
    ax.legend(fontsize="small")


def plot_metrics(ax, test_rows, curves):
    """Test metrics against the epoch; ``curves`` = [(test_metrics.csv column, label), ...]."""
    from matplotlib.ticker import MaxNLocator

    epochs = [int(r["epoch"]) for r in test_rows]
    for column, label in curves:
        ax.plot(epochs, [float(r[column]) for r in test_rows], "o-", label=label)
    ax.set(xlabel="epoch", ylabel="test metric", ylim=(0, 1.02), title="test metrics")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small", loc="lower right")


def metric_curves(class_names):
    """The curves plot_metrics draws: pixel accuracy, mean IoU and the Dice of each class
    (``class_names``: {class id: name})."""
    return ([("pixel_accuracy", "pixel accuracy"), ("mean_iou", "mean IoU")]
            + [(f"dice_{k}", f"Dice {name}") for k, name in class_names.items()])


def save_training_plots(output_dir, number_classes, curves=None):
    """plots/loss.png and plots/metrics.png of a training output folder, from its CSVs (``curves``:
    plot_metrics' curves; None = the segmentation metrics of ``number_classes`` classes)."""
    if curves is None:
        curves = metric_curves({k: str(k) for k in range(number_classes)})
    plt = _pyplot()
    train_rows = read_csv(os.path.join(output_dir, "train_loss.csv"))
    test_rows = read_csv(os.path.join(output_dir, "test_metrics.csv"))
    os.makedirs(os.path.join(output_dir, "plots"), exist_ok=True)
    for name, draw in (("loss.png", lambda ax: plot_loss(ax, train_rows, test_rows)),
                       ("metrics.png", lambda ax: plot_metrics(ax, test_rows, curves))):
        fig, ax = plt.subplots(figsize=(7, 4))
        draw(ax)
        fig.tight_layout()
        fig.savefig(os.path.join(output_dir, "plots", name), dpi=100)
        plt.close(fig)
