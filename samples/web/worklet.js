// cochlea capture worklet: microphone → mono → 16 kHz → 20 ms frames.
//
// Runs on the audio rendering thread. Every input block (128 frames at the
// AudioContext's rate) is mixed down to mono; if the context does not run at
// the target rate (a browser that refused AudioContext({sampleRate: 16000})),
// it is resampled here with a windowed-sinc low-pass interpolator. Each full
// frame (320 samples at 16 kHz = 20 ms) is posted to the page as a
// Float32Array, with its RMS and peak for the level meter. A "flush" message
// posts what is left as a shorter last frame, so no sample is lost at stop.

const HALF_WIDTH_OUT = 8; // kernel half-width, in output samples

class CochleaCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = (options && options.processorOptions) || {};
    this.targetRate = o.targetRate || 16000;
    this.frameSamples = o.frameSamples || 320;
    // `sampleRate` is the context's rate (a global of the worklet scope).
    this.ratio = sampleRate / this.targetRate;
    this.frame = new Float32Array(this.frameSamples);
    this.filled = 0;
    this.running = true;
    if (this.ratio !== 1) {
      // Low-pass at 90 % of the target Nyquist frequency when downsampling.
      this.cutoff = Math.min(1, 1 / this.ratio) * 0.9 * 0.5; // cycles per input sample
      this.halfTaps = Math.ceil(HALF_WIDTH_OUT * Math.max(1, this.ratio));
      // Input history; `pos` is where the next output sample falls in it.
      this.history = new Float32Array(0);
      this.pos = 0;
    }
    this.port.onmessage = (event) => {
      if (event.data && event.data.type === "flush") {
        if (this.filled > 0) this.post(this.frame.slice(0, this.filled));
        this.filled = 0;
        this.running = false;
        this.port.postMessage({ type: "flushed" });
      }
    };
  }

  post(samples) {
    let sum = 0;
    let peak = 0;
    for (let i = 0; i < samples.length; i++) {
      const s = samples[i];
      sum += s * s;
      const a = Math.abs(s);
      if (a > peak) peak = a;
    }
    const rms = samples.length ? Math.sqrt(sum / samples.length) : 0;
    this.port.postMessage({ type: "audio", samples, rms, peak }, [samples.buffer]);
  }

  push(sample) {
    this.frame[this.filled++] = sample;
    if (this.filled === this.frameSamples) {
      this.post(this.frame);
      this.frame = new Float32Array(this.frameSamples);
      this.filled = 0;
    }
  }

  kernel(d) {
    // Windowed sinc (Blackman window over ±halfTaps input samples).
    const x = d / this.halfTaps;
    if (x <= -1 || x >= 1) return 0;
    const w = 0.42 + 0.5 * Math.cos(Math.PI * x) + 0.08 * Math.cos(2 * Math.PI * x);
    const arg = 2 * this.cutoff * d;
    const sinc = arg === 0 ? 1 : Math.sin(Math.PI * arg) / (Math.PI * arg);
    return 2 * this.cutoff * sinc * w;
  }

  resample(mono) {
    const joined = new Float32Array(this.history.length + mono.length);
    joined.set(this.history, 0);
    joined.set(mono, this.history.length);
    const h = this.halfTaps;
    // An output sample needs input up to pos + halfTaps.
    while (this.pos + h < joined.length) {
      const centre = Math.floor(this.pos);
      let acc = 0;
      let norm = 0;
      for (let k = centre - h + 1; k <= centre + h; k++) {
        const weight = this.kernel(this.pos - k);
        // Before the first input sample: silence.
        if (k >= 0) acc += joined[k] * weight;
        norm += weight;
      }
      this.push(norm > 0 ? acc / norm : 0);
      this.pos += this.ratio;
    }
    // Keep only what later output samples still reach.
    const keepFrom = Math.max(0, Math.floor(this.pos) - h);
    this.history = joined.slice(keepFrom);
    this.pos -= keepFrom;
  }

  process(inputs) {
    if (!this.running) return false;
    const input = inputs[0];
    if (!input || input.length === 0) return true; // no source connected yet
    const length = input[0].length;
    const mono = new Float32Array(length);
    for (let c = 0; c < input.length; c++) {
      const channel = input[c];
      for (let i = 0; i < length; i++) mono[i] += channel[i];
    }
    if (input.length > 1) {
      for (let i = 0; i < length; i++) mono[i] /= input.length;
    }
    if (this.ratio === 1) {
      for (let i = 0; i < length; i++) this.push(mono[i]);
    } else {
      this.resample(mono);
    }
    return true;
  }
}

registerProcessor("cochlea-capture", CochleaCapture);
