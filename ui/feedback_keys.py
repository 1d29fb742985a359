"""Keyboard shortcuts of the Feedback tab, for rating a round quickly: j / → next image, k / ← previous, 1-5 stars,
+ like, - dislike. Plain JavaScript run once on page load (ui/app.py: `demo.load(js=KEYS_JS)`); a key only clicks
the tab's own gallery thumbnails and rating buttons, so every rating still goes through the same server events
(and the same checks) as a mouse click. Keys are ignored while typing in a field and when the tab is hidden."""

KEYS_HELP = "Keys: **j** / **→** next image, **k** / **←** previous, **1**-**5** stars, **+** like, **-** dislike."

KEYS_JS = """
() => {
  if (window.__styleboothFeedbackKeys) return;
  window.__styleboothFeedbackKeys = true;
  let index = null;  // the selected image of the round, as the thumbnails show it
  const thumbs = () => Array.from(document.querySelectorAll('#fb-gallery img'));
  document.addEventListener('click', (e) => {
    const el = e.target;
    if (!el || !el.closest) return;
    if (el.closest('#fb-round')) { index = null; return; }  // a new round starts from its first image
    const inGallery = el.closest('#fb-gallery');
    if (!inGallery) return;
    const i = thumbs().findIndex((t) => t === el || el.contains(t) || t.contains(el));
    if (i >= 0) index = i;
  }, true);
  document.addEventListener('keydown', (e) => {
    const gallery = document.querySelector('#fb-gallery');
    if (!gallery || gallery.offsetParent === null || e.ctrlKey || e.metaKey || e.altKey) return;
    const t = e.target;
    if (t && (t.isContentEditable || ['INPUT', 'TEXTAREA', 'SELECT'].includes(t.tagName))) return;
    const press = (selector) => {
      const b = document.querySelector(selector);
      if (b) { e.preventDefault(); b.click(); }
    };
    const k = e.key;
    if (['j', 'ArrowRight', 'k', 'ArrowLeft'].includes(k)) {
      const all = thumbs();
      if (!all.length) return;
      const step = (k === 'j' || k === 'ArrowRight') ? 1 : -1;
      index = index === null ? 0 : Math.min(all.length - 1, Math.max(0, index + step));
      e.preventDefault();
      all[index].click();
    } else if (k >= '1' && k <= '5' && k.length === 1) {
      press('#fb-star-' + k);
    } else if (k === '+' || k === '=') {
      press('#fb-up');
    } else if (k === '-' || k === '_') {
      press('#fb-down');
    }
  });
}
"""
