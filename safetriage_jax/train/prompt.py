"""Prompt training: the diffusion prompt generator learns, the TPSMM backbone stays frozen.

The backbone's variables are a jit argument of the step, never part of the train state or the
optimizer, and enter the loss through ``stop_gradient``: only the prompt generator's parameters
receive gradients. The objective is the frozen backbone's motion-transfer fidelity on prompted
driving frames of simulated patients (perceptual + L1 against the synthetic person rendered with
the patient's motion, and keypoint consistency), plus the generator's denoising loss. Same mesh,
sharding, loop, checkpoints and logs as the backbone trainer (``train/trainer.py``'s
``MeshTrainer`` and ``fit``).
"""

import functools
import json
import pathlib

import flax
import jax
import jax.numpy as jnp
import optax

from safetriage_jax.animate import relative_keypoints
from safetriage_jax.data.simulated_patients import IMAGE_KEYS, PatientOptions, patient_batches
from safetriage_jax.models import prompt as prompt_lib
from safetriage_jax.models.policy import Policy
from safetriage_jax.models.tpsmm import TPSMM
from safetriage_jax.train import augment, losses
from safetriage_jax.train.trainer import MeshTrainer, fit, owned_workdir, write_from_primary


@flax.struct.dataclass
class PromptState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


def prompt_optimizer(train_cfg):
    """Adam with linear warm-up then cosine decay, after global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, train_cfg.lr, train_cfg.warmup_steps, max(train_cfg.num_steps, train_cfg.warmup_steps + 1))
    return optax.chain(optax.clip_by_global_norm(train_cfg.max_grad_norm), optax.adam(schedule))


def transfer(model, backbone, identity_BHW3, reference_BHW3, driving_BHW3):
    """The frozen backbone's relative-mode motion transfer onto the identity (unit movement
    scale): the driving keypoints' motion since the reference frame moves the identity's."""
    keypoints = lambda image: model.apply(backbone, image, method=TPSMM.keypoints)
    kp_identity = keypoints(identity_BHW3)
    kp_target = relative_keypoints(kp_identity, keypoints(driving_BHW3), keypoints(reference_BHW3), 1.0)
    motion = model.apply(backbone, identity_BHW3, kp_target, kp_identity, method=TPSMM.dense_motion)
    features = model.apply(backbone, identity_BHW3, method=TPSMM.encode_source)
    return model.apply(backbone, features, identity_BHW3, motion, method=TPSMM.decode)["prediction"]


def prompt_both(params, pcfg, batch):
    """Prompts the driving and the reference frames in one sampler call: (driving, reference,
    x0, condition), the last two for the denoising loss."""
    frames = jnp.concatenate([batch["driving"], batch["reference"]])
    references = jnp.concatenate([batch["reference"], batch["reference"]])
    identities = jnp.concatenate([batch["identity"], batch["identity"]])
    cond = prompt_lib.condition(frames, references, identities, pcfg.resolution)
    x0 = prompt_lib.sample_x0(params, cond, pcfg)
    prompted = frames + prompt_lib.prompt_image(x0, frames.shape[1], pcfg.amplitude)
    driving, reference = jnp.split(prompted, 2)
    return driving, reference, x0, cond


def prompt_losses(params, backbone, batch, rng, *, model, pcfg, vgg_features, train_cfg):
    """Weighted losses for one batch -> (total, terms)."""
    weights = train_cfg.loss_weights
    backbone = jax.lax.stop_gradient(backbone)
    driving, reference, x0, cond = prompt_both(params, pcfg, batch)
    prediction = transfer(model, backbone, batch["identity"], reference, driving)
    target = batch["target"]
    terms = {
        "perceptual": losses.perceptual(vgg_features, prediction, target, train_cfg.scales,
                                        weights.perceptual),
        "l1": weights.l1 * jnp.mean(jnp.abs(prediction - target)),
        "keypoints": weights.keypoints * jnp.mean(jnp.abs(
            model.apply(backbone, prediction, method=TPSMM.keypoints)
            - jax.lax.stop_gradient(model.apply(backbone, target, method=TPSMM.keypoints)))),
        "denoising": weights.denoising * prompt_lib.denoising_loss(
            params, pcfg, jax.lax.stop_gradient(x0), jax.lax.stop_gradient(cond), rng),
    }
    return sum(terms.values()), terms


def prompt_train_step(state, batch, backbone, vgg_params, *, model, vgg, tx, pcfg, cfg):
    """One optimizer step of the prompt generator -> (new state, metrics)."""
    rng = jax.random.fold_in(state.rng, state.step)
    jitter_key, loss_key = jax.random.split(rng)
    stacked = augment.color_jitter(jitter_key, jnp.stack([batch[k] for k in IMAGE_KEYS], 1),
                                   **cfg.data.jitter)  # one jitter per example, all four images
    batch = dict(zip(IMAGE_KEYS, jnp.moveaxis(stacked, 1, 0)))
    vgg_features = functools.partial(vgg.apply, jax.lax.stop_gradient(vgg_params))
    loss_fn = functools.partial(prompt_losses, backbone=backbone, batch=batch, rng=loss_key,
                                model=model, pcfg=pcfg, vgg_features=vgg_features,
                                train_cfg=cfg.train)
    (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(terms, loss=total, grad_norm=optax.tree.norm(grads))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


class PromptTrainer(MeshTrainer):
    """The frozen backbone (replicated), the prompt generator, its optimizer and jitted step."""

    image_keys = IMAGE_KEYS

    def __init__(self, config, backbone_config, backbone, mesh=None):
        super().__init__(config, mesh)
        self.pcfg = prompt_lib.PromptConfig.from_dict(config.prompt.to_dict())
        self.model = TPSMM(backbone_config,
                           Policy(warp_implementation=config.train.warp_implementation))
        self.backbone = jax.device_put(backbone, self.replicated)
        self.tx = prompt_optimizer(config.train)
        self.step = self.jit_step(functools.partial(
            prompt_train_step, model=self.model, vgg=self.vgg, tx=self.tx, pcfg=self.pcfg,
            cfg=config), num_extras=2)
        self.predict = self.jit_predict(self._predict_impl)

    def initial_state(self):
        """(prompt state, VGG variables) from the config's seed, replicated over the mesh."""
        prompt_key, vgg_key, step_key = jax.random.split(jax.random.PRNGKey(self.config.train.seed), 3)
        params = prompt_lib.init_params(self.pcfg, prompt_key)
        state = PromptState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=self.tx.init(params), rng=step_key)
        return jax.device_put(state, self.replicated), self.vgg_variables(vgg_key)

    def step_extras(self, vgg):
        return (self.backbone, vgg)

    def predict_extras(self):
        return (self.backbone,)

    def checkpoint_meta(self):
        return {"prompt": json.loads(self.pcfg.to_json())}

    def _predict_impl(self, state, images, backbone):
        """Columns for the sample grid: identity | driving | prompt (x4, grey = 0) | prompted
        driving | transfer without prompt | with prompt | target."""
        driving, reference, _, _ = prompt_both(state.params, self.pcfg, images)
        plain = transfer(self.model, backbone, images["identity"], images["reference"],
                         images["driving"])
        prompted = transfer(self.model, backbone, images["identity"], reference, driving)
        shown = jnp.clip(0.5 + 4 * (driving - images["driving"]), 0, 1)
        return (images["identity"], images["driving"], shown, driving, plain, prompted,
                images["target"])


def patient_options(config, image_size):
    d = config.data
    return PatientOptions(size=image_size, clip_frames=d.clip_frames,
                          asymmetry=tuple(d.asymmetry), blink_rate=tuple(d.blink_rate))


def train_prompt(config, workdir, *, resume=False, progress=True):
    """Trains the prompt generator against the frozen backbone ``config.backbone``; writes
    ``workdir/prompt``. Returns (final state, last metrics)."""
    workdir = pathlib.Path(workdir).expanduser().absolute()
    with owned_workdir(workdir):
        return _train_prompt(config, workdir, resume, progress)


def _train_prompt(config, workdir, resume, progress):
    from safetriage_jax.model_dir import load_model, save_prompt
    backbone_config, backbone = load_model(pathlib.Path(config.backbone).expanduser())
    trainer = PromptTrainer(config, backbone_config, backbone)
    batches = lambda start_step: patient_batches(
        patient_options(config, backbone_config.image_size), config.train.batch_size,
        seed=config.train.seed, start_step=start_step, num_steps=config.train.num_steps,
        worker_count=config.data.worker_count)
    state, metrics = fit(trainer, workdir, batches, config=config,
                         num_steps=config.train.num_steps, resume=resume, progress=progress,
                         desc="train-prompt")
    params = jax.device_get(state.params)
    info = {"backbone": str(config.backbone), "image_size": backbone_config.image_size,
            "steps": int(jax.device_get(state.step))}
    write_from_primary(lambda: save_prompt(workdir / "prompt", trainer.pcfg, params, info=info),
                       "prompt-written")
    return state, metrics
