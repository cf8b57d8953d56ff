// The console's shell: sign-in, navigation between pages (by the URL's hash, so each page
// can be linked and reloaded), and the notice line every page reports through.
import { claims, resetSubscriptions, setToken, token } from './api.js';
import { h, pages } from './pages.js';

const main = document.getElementById('main');
const nav = document.getElementById('nav');
const who = document.getElementById('who');
const signOut = document.getElementById('sign-out');
let leave = null;

/// A link made by `orderly console-link` carries a token in the hash, which browsers never
/// send to the server; it is moved to the session and taken out of the address bar.
function takeTokenFromLink() {
  const match = location.hash.match(/^#token=([^&]+)/);
  if (!match) return;
  setToken(decodeURIComponent(match[1]));
  history.replaceState(null, '', `${location.pathname}#/log`);
}

function signInPage() {
  const input = h('textarea', { id: 'token', rows: 4, placeholder: 'eyJhbGciOi…', required: true });
  const form = h(
    'form',
    { class: 'card signin' },
    h('h1', {}, 'Sign in'),
    h('p', {}, 'Paste a bearer token with the admin role. ',
      h('code', {}, 'orderly console-link'), ' prints a short-lived link that signs you in.'),
    h('label', { for: 'token' }, 'Bearer token'),
    input,
    h('button', { type: 'submit' }, 'Sign in'),
  );
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    setToken(input.value.trim());
    resetSubscriptions();
    location.hash = '#/log';
    route();
  });
  return form;
}

export function notify(text, kind = 'info') {
  const notice = document.getElementById('notice');
  notice.textContent = text;
  notice.className = kind;
  notice.hidden = !text;
}

function route() {
  if (leave) leave();
  leave = null;
  notify('');
  const signedIn = Boolean(token());
  nav.hidden = !signedIn;
  signOut.hidden = !signedIn;
  const identity = claims();
  who.textContent = identity ? `${identity.sub} (${(identity.roles || []).join(', ')})` : '';
  main.replaceChildren();
  if (!signedIn) {
    main.append(signInPage());
    return;
  }
  const [name, ...rest] = location.hash.replace(/^#\//, '').split('/');
  const page = pages[name] ? name : 'log';
  for (const link of nav.querySelectorAll('a[data-page]')) {
    link.classList.toggle('current', link.dataset.page === page);
  }
  leave = pages[page](main, { notify, arg: decodeURIComponent(rest.join('/')) });
}

signOut.addEventListener('click', () => {
  setToken(null);
  resetSubscriptions();
  location.hash = '';
  route();
});
window.addEventListener('hashchange', route);
takeTokenFromLink();
route();
