"""Named training configurations: plain dicts of argument defaults; command-line flags override them."""

PRESETS: dict[str, dict] = {
    # The committed default model: the wide-domain shapes dataset (training/datasets/shapes_wide.py),
    # a small CNN trained from scratch at 64x64 (see docs/MODEL.md for why 64).
    "default": dict(
        dataset="shapes_wide", backbone="small_cnn", weights=None, image_size=64, attention_dim=256,
        embedding_dim=128, attention="luong", vocab_size=1000, min_count=1, max_length=24,
        batch_size=32, epochs=10, learning_rate=2e-3, patience=3, train_limit=24000, val_limit=500,
        name="shapes-wide-small-cnn",
    ),
    # The reference design: frozen InceptionResNetV2 at 299x299, five captions per image. Names no
    # dataset: pass --dataset coco|karpathy|flickr8k|list and its --data options.
    "reference": dict(
        backbone="inception_resnet_v2", weights="imagenet", trainable_backbone=False, image_size=299,
        attention_dim=512, embedding_dim=512, attention="luong", vocab_size=20000, min_count=1,
        max_length=64, batch_size=32, epochs=20, learning_rate=1e-3, patience=3, name="reference",
    ),
    # ShapeWorld (an external generator's captions, in COCO format, see docs/TRAINING.md): 64x64
    # scenes, a 44-word vocabulary, captions of up to 13 words; about 15 minutes on two CPU cores.
    "shapeworld": dict(
        dataset="coco", backbone="small_cnn", weights=None, image_size=64, attention_dim=256,
        embedding_dim=128, attention="luong", vocab_size=1000, min_count=1, max_length=16,
        batch_size=32, epochs=12, learning_rate=2e-3, patience=3, name="shapeworld-small-cnn",
    ),
    # A quick run for smoke tests and CI.
    "tiny": dict(
        dataset="shapes", backbone="small_cnn", weights=None, image_size=64, attention_dim=32,
        embedding_dim=16, attention="luong", vocab_size=1000, min_count=1, max_length=24,
        batch_size=16, epochs=1, learning_rate=3e-3, patience=1, train_limit=64, val_limit=16,
        name="shapes-tiny",
    ),
}
